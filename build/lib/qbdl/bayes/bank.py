"""A bank of pre-drawn FP32 weight samples: a BNN that runs at deterministic-network speed."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .layers import BayesianLayer
from .predict import sampling


class WeightBank(nn.Module):
    """`size` weight samples of `bnn` drawn once (seeded); MC sample s uses entry s mod size.

    Without an MC index (plain forward) a random entry is used, drawn from the global torch generator.
    """

    def __init__(self, bnn: nn.Module, size: int, seed: int = 0) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"bank size must be >= 1, got {size}")
        self.model = bnn
        self.size = size
        self.mc_index: int | None = None
        gen = torch.Generator().manual_seed(seed)
        self.bank: list[dict[str, Tensor]] = []
        layers = {name: m for name, m in bnn.named_modules() if isinstance(m, BayesianLayer)}
        with torch.no_grad():
            for _ in range(size):
                entry = {}
                for name, m in layers.items():
                    prefix = f"{name}." if name else ""
                    for p in ("weight", "bias"):
                        mu = getattr(m, f"mu_{p}")
                        if mu is None:
                            continue
                        sigma = getattr(m, f"sigma_{p}")
                        eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype).to(mu.device)
                        entry[f"{prefix}mu_{p}"] = mu + sigma * eps
                self.bank.append(entry)

    def set_mc_index(self, index: int | None) -> None:
        """Select bank entry `index` (mod size) for the next forward passes; None = random entries."""
        self.mc_index = index

    def forward(self, x: Tensor) -> Tensor:
        s = self.mc_index if self.mc_index is not None else int(torch.randint(self.size, ()).item())
        # in 'mean' mode a Bayesian layer computes with its mu tensors: swap the sample in for them
        with sampling(self.model, "mean"):
            return functional_call(self.model, self.bank[s % self.size], (x,), strict=False)
