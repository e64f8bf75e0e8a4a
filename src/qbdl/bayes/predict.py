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


def _input_channels(model: nn.Module) -> tuple[str, int] | None:
    """The name and input channels of the first convolution `model` runs (graph order for fx models)."""
    if hasattr(model, "graph"):
        mods = [(n.target, model.get_submodule(n.target)) for n in model.graph.nodes if n.op == "call_module"]
    else:
        mods = list(model.named_modules())
    for name, m in mods:
        if hasattr(m, "weight_shape") and getattr(m, "kind", "linear").startswith("conv"):  # an INT8 layer
            return name, int(m.weight_shape[1]) * int(m.config.get("groups", 1))
        if isinstance(getattr(m, "in_channels", None), int):
            return name, m.in_channels
    return None


def check_images(model: nn.Module, x: Tensor) -> None:
    """Refuse inputs a model cannot give a meaningful prediction for, in one clear error (ValueError).

    Policy: non-finite values (NaN, inf) are refused, not clamped (a NaN would silently quantize to the zero
    point); empty images (a 0-sized dimension other than the batch) and a wrong channel count are refused.
    A batch of 0 images is allowed and gives an empty prediction.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(
            f"the model's input must be a float tensor of images [N, C, H, W], got "
            f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}; convert images with the datamodule's "
            "transforms (ToTensor + Normalize)"
        )
    if any(d == 0 for d in x.shape[1:]):
        raise ValueError(
            f"empty images: input shape {list(x.shape)} has a dimension of size 0; every image needs at least "
            "one pixel in each dimension (check the resize / crop settings and the image files)"
        )
    if x.dim() >= 3:
        first = _input_channels(model)
        if first is not None and x.shape[1] != first[1]:
            raise ValueError(
                f"the images have {x.shape[1]} channels but the model's first layer ({first[0]}) reads "
                f"{first[1]}; give {'grayscale' if first[1] == 1 else f'{first[1]}-channel'} images "
                "(the datamodule's `channels` / transforms) or use a model trained on this kind of image"
            )
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = ~torch.isfinite(x)
        rows = bad.flatten(1).any(1).nonzero().flatten().tolist() if x.dim() > 1 else []
        raise ValueError(
            f"{int(bad.sum())} input values are NaN or infinite (images {rows[:5]}{'...' if len(rows) > 5 else ''} "
            "of this batch): qbdl refuses them instead of predicting from garbage. Find the corrupt images "
            "(e.g. a division by a zero standard deviation in the normalisation) and drop or fix them"
        )


@torch.no_grad()
def mc_logits(
    model: nn.Module, x: Tensor, samples: int, seed: int | None = None, first_index: int = 0
) -> Tensor:
    """Logits (float32) of `samples` stochastic forward passes, shape [S, B, C].

    The passes are MC indices first_index..first_index+samples-1. With `seed`, index s runs under RNG seed
    sample_seed(seed, s), so every model sees the same stream.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    check_images(model, x)
    was_training = model.training
    model.eval()
    out = []
    try:
        for s in range(first_index, first_index + samples):
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
