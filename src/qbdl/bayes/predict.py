"""Sampling mode switch and seeded Monte Carlo prediction."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .layers import MODES


def _stochastic_modules(model: nn.Module) -> list[nn.Module]:
    # Anything with a `mode` in MODES is stochastic: FP32 Bayesian layers and the INT8 ones of qbdl.quant.
    return [m for m in model.modules() if getattr(m, "mode", None) in MODES]


@contextlib.contextmanager
def sampling(model: nn.Module, mode: str = "sample") -> Iterator[nn.Module]:
    """Context manager: 'sample' draws weights, 'mean' uses the posterior mean (deterministic)."""
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {MODES}")
    mods = _stochastic_modules(model)
    old = [m.mode for m in mods]
    for m in mods:
        m.mode = mode
    try:
        yield model
    finally:
        for m, o in zip(mods, old):
            m.mode = o


def set_mc_index(model: nn.Module, index: int | None) -> None:
    """Tell sample-bank layers which bank entry MC sample `index` uses (no-op for other layers)."""
    for m in model.modules():
        if hasattr(m, "set_mc_index"):
            m.set_mc_index(index)


def sample_seed(seed: int, index: int) -> int:
    """The RNG seed of MC sample `index`: the same for every model variant."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


@torch.no_grad()
def mc_logits(model: nn.Module, x: Tensor, samples: int, seed: int | None = None) -> Tensor:
    """Logits (float32) of `samples` stochastic forward passes, shape [S, B, C].

    With `seed`, sample s runs under RNG seed sample_seed(seed, s), so every model sees the same stream.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(samples):
            set_mc_index(model, s)
            if seed is None:
                out.append(model(x).float())
                continue
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(sample_seed(seed, s))
                out.append(model(x).float())
    finally:
        set_mc_index(model, None)
        model.train(was_training)
    return torch.stack(out)


def mc_predict(model: nn.Module, x: Tensor, samples: int, seed: int | None = None) -> Tensor:
    """Softmax probabilities of `samples` stochastic forward passes, shape [S, B, C] (see mc_logits)."""
    return torch.softmax(mc_logits(model, x, samples, seed), dim=-1)
