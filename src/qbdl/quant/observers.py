"""Activation range observers and affine qparams (uint8 per tensor, configurable bits)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .histogram import HistogramRange

OBSERVERS = ("minmax", "histogram", "percentile")


def affine_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """Scale and zero point of an unsigned `bits`-bit affine grid covering [lo, hi] (and 0)."""
    qmax = 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, 1e-8)
    zp = int(min(max(round(-lo / scale), 0), qmax))
    return float(scale), zp


class ActObserver(nn.Module):
    """Records the range of an activation; `kind` picks min/max, a histogram (L2 search) or percentiles."""

    def __init__(self, kind: str = "minmax", percentile: float = 99.99, max_keep: int = 2_000_000) -> None:
        super().__init__()
        if kind not in OBSERVERS:
            raise ValueError(f"unknown observer {kind!r}; choose one of {OBSERVERS}")
        self.kind, self.percentile, self.max_keep = kind, percentile, max_keep
        self.enabled = True
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self._samples: list[Tensor] = []
        self._gen = torch.Generator().manual_seed(0)
        self._hist = None
        if kind == "histogram":
            self._hist = HistogramRange()

    @property
    def initialized(self) -> bool:
        """True once at least one tensor was observed."""
        return bool(torch.isfinite(self.min_val))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the range statistics with `x`."""
        x = x.detach().float()
        self.min_val.copy_(torch.minimum(self.min_val, x.min()))
        self.max_val.copy_(torch.maximum(self.max_val, x.max()))
        if self.kind == "percentile":
            flat = x.flatten()
            if flat.numel() > 65536:
                # random subsample from a private generator: deterministic, leaves the global RNG alone
                # (a strided one would alias with the NCHW layout, e.g. keep only border columns)
                idx = torch.randint(0, flat.numel(), (65536,), generator=self._gen).to(flat.device)
                flat = flat[idx]
            self._samples.append(flat.cpu())
            if sum(s.numel() for s in self._samples) > self.max_keep:
                self._samples = [torch.cat(self._samples)[::2]]
        elif self.kind == "histogram":
            self._hist.observe(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled:
            self.observe(x)
        return x

    def range(self) -> tuple[float, float]:
        """The (lo, hi) range to quantize, per the observer kind."""
        if not self.initialized:
            raise RuntimeError("observer saw no data: run calibrate() before convert()")
        if self.kind == "percentile" and self._samples:
            s = torch.cat(self._samples)
            q = torch.tensor([(100 - self.percentile) / 100, self.percentile / 100])
            lo, hi = torch.quantile(s[:16_000_000], q).tolist()
            return lo, hi
        if self.kind == "histogram" and self._hist is not None:
            return self._hist.range()
        return float(self.min_val), float(self.max_val)

    def qparams(self, bits: int = 8) -> tuple[float, int]:
        """Scale and zero point for unsigned `bits`-bit activations."""
        return affine_qparams(*self.range(), bits=bits)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def fake_quant_act(x: Tensor, obs: ActObserver, bits: int) -> Tensor:
    """Fake-quantize an activation with the observer's current min/max (straight-through gradient)."""
    if not obs.initialized:
        return x
    scale, zp = affine_qparams(float(obs.min_val), float(obs.max_val), bits)
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 2**bits - 1)


def symmetric_scale(w: Tensor, bits: int = 8) -> Tensor:
    """Per-output-channel symmetric scale max|w|/qmax (dim 0), floored to stay positive."""
    qmax = 2 ** (bits - 1) - 1
    return (w.detach().abs().flatten(1).amax(1) / qmax).clamp_min(1e-12)


def fake_quant_weight(w: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    """Per-channel symmetric fake quantization with a straight-through gradient."""
    qmax = 2 ** (bits - 1) - 1
    zp = torch.zeros(scale.numel(), dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale.float(), zp, 0, -qmax, qmax)
