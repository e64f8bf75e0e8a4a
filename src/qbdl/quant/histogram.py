"""The histogram range observer: a running histogram, then an L2 search for the range that quantizes it best.

The algorithm and its floating-point steps are those of torch.ao's HistogramObserver (itself caffe2's
NormMinimization::NonlinearQuantizationParamsSearch) for per-tensor affine uint8, written out here so that
no deprecated torch.ao code runs; tests/test_quant_observers.py checks it gives torch.ao's qparams exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = torch.tensor(torch.finfo(torch.float32).eps)


class HistogramRange:
    """Running 2048-bin histogram of the observed values; `range()` is the L2-optimal clipping range."""

    def __init__(self, bins: int = 2048, dst_bins: int = 256, upsample_rate: int = 16) -> None:
        self.bins, self.dst_bins, self.upsample_rate = bins, dst_bins, upsample_rate
        self.histogram = torch.zeros(bins)
        self.min_val = torch.tensor(float("inf"))
        self.max_val = torch.tensor(float("-inf"))

    def observe(self, x: Tensor) -> None:
        """Add `x`'s values; the bins stretch (re-binning the old counts) when `x` leaves the current range."""
        x = x.detach().float().cpu()
        if x.numel() == 0:
            return
        x = x[x.abs() != torch.inf] if not torch.isfinite(x).all() else x
        if x.numel() == 0:
            return
        x_min, x_max = torch.aminmax(x)
        if self.min_val == float("inf") or self.max_val == float("-inf"):
            self.min_val, self.max_val = x_min.clone(), x_max.clone()
            self.histogram = torch.histc(x, self.bins, min=x_min.item(), max=x_max.item())
            return
        new_min, new_max = torch.min(self.min_val, x_min), torch.max(self.max_val, x_max)
        update = torch.histc(x, self.bins, min=new_min.item(), max=new_max.item())
        if new_min == self.min_val and new_max == self.max_val:
            self.histogram = self.histogram + update
            return
        if self.min_val == self.max_val:
            moved = torch.histc(self.min_val, self.bins, min=new_min.item(), max=new_max.item())
            self.histogram = moved * self.histogram.sum() + update
        else:
            self.histogram = update + self._upscale(new_min, new_max)
        self.min_val, self.max_val = new_min, new_max

    def _upscale(self, new_min: Tensor, new_max: Tensor) -> Tensor:
        # each old bin split into upsample_rate equal parts, each part's mass moved to the new bin of its centre
        n = self.bins * self.upsample_rate
        hist = self.histogram.repeat_interleave(self.upsample_rate) / self.upsample_rate
        size = (self.max_val - self.min_val) / n
        mids = torch.linspace(self.min_val.item(), self.max_val.item(), n + 1)[:-1] + 0.5 * size
        bounds = torch.linspace(new_min.item(), new_max.item(), self.bins + 1)
        bucket = (torch.bucketize(mids, bounds, right=True) - 1).clamp_(0, self.bins - 1)
        return torch.bincount(bucket, weights=hist, minlength=self.bins)

    @staticmethod
    def _norm(begin: Tensor, end: Tensor, density: Tensor) -> Tensor:
        return density * (end * end * end - begin * begin * begin) / 3

    def _error(self, start: int, end: int) -> float:
        """L2 error of quantizing the histogram to dst_bins levels over bins start..end."""
        width = (self.max_val.item() - self.min_val.item()) / self.bins
        dst = width * (end - start + 1) / self.dst_bins
        if dst == 0.0:
            return 0.0
        src = torch.arange(self.bins)
        src_begin = (src - start) * width
        src_end = src_begin + width
        dst_of_begin = torch.clamp(torch.div(src_begin, dst, rounding_mode="floor"), 0, self.dst_bins - 1)
        dst_of_end = torch.clamp(torch.div(src_end, dst, rounding_mode="floor"), 0, self.dst_bins - 1)
        density = self.histogram / width
        norm = torch.zeros(self.bins)
        norm += self._norm(src_begin - (dst_of_begin + 0.5) * dst, torch.ones(self.bins) * (dst / 2), density)
        norm += (dst_of_end - dst_of_begin - 1) * self._norm(
            torch.tensor(-dst / 2), torch.tensor(dst / 2), density
        )
        norm += self._norm(torch.tensor(-dst / 2), src_end - (dst_of_end * dst + dst / 2), density)
        return norm.sum().item()

    def _search(self) -> tuple[Tensor, Tensor]:
        width = (self.max_val - self.min_val) / self.bins
        total = torch.sum(self.histogram).item()
        csum = torch.cumsum(self.histogram, dim=0)
        step, alpha, beta = 1e-5, 0.0, 1.0
        start, end = 0, self.bins - 1
        norm_min = float("inf")
        while alpha < beta:
            next_alpha, next_beta = alpha + step, beta - step
            lo, hi = start, end
            while lo < end and csum[lo] < next_alpha * total:
                lo += 1
            while hi > start and csum[hi] > next_beta * total:
                hi -= 1
            next_start, next_end = start, end
            if (lo - start) > (end - hi):
                next_start, alpha = lo, next_alpha
            else:
                next_end, beta = hi, next_beta
            if next_start == start and next_end == end:
                continue
            norm = self._error(next_start, next_end)
            if norm > norm_min:
                break
            norm_min, start, end = norm, next_start, next_end
        return self.min_val + width * start, self.min_val + width * (end + 1)

    def range(self) -> tuple[float, float]:
        """The chosen range, as the end points of the uint8 grid torch.ao would derive from it."""
        lo, hi = self._search()
        lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
        scale = torch.max((hi - lo) / 255.0, _EPS)
        zp = int(torch.clamp(0 - torch.round(lo / scale).to(torch.int), 0, 255))
        scale = float(scale)
        return -zp * scale, (255 - zp) * scale
