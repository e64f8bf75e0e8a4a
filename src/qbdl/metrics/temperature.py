"""Temperature scaling (Guo et al. 2017) of MC logits ``[S, B, C]``: one scalar ``T`` for every sample.

The fitted predictive is ``pbar_T = mean_s softmax(logits_s / T)``: the temperature divides each MC
sample's logits before the average (``S = 1`` is plain temperature scaling of a deterministic net).
``T`` minimises the NLL ``-mean_b log pbar_T[b, y_b]`` over ``log T`` in float64: a grid scan of
``log T`` over ``bounds`` picks the best bracket, then golden-section search refines it to a
relative tolerance of 1e-6 in ``T``.  No randomness, no learning rate, no autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qbdl.metrics.ood import validate_logits
from qbdl.metrics.validation import validate_targets

__all__ = ["fit_temperature", "apply_temperature", "temperature_nll"]

_GRID = 25  # log-T grid points for the bracket search
_CHUNK = 1 << 22  # max elements of one [S, b, C] block in the NLL (bounds memory on large sets)
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def _nll_at(l64: Tensor, y: Tensor, t: float) -> float:
    # log mean_s softmax(l_s / T)[y] = logsumexp_s log_softmax(l_s / T)[y] - log S  (stable in float64)
    s, b, c = l64.shape
    step = max(1, _CHUNK // (s * c))
    total = 0.0
    for i in range(0, b, step):
        blk, yb = l64[:, i : i + step], y[i : i + step]
        logp = torch.log_softmax(blk / t, dim=-1)  # [S, b, C]
        logp_y = logp.gather(2, yb.long().view(1, -1, 1).expand(s, -1, 1)).squeeze(2)  # [S, b]
        total += float((torch.logsumexp(logp_y, 0) - math.log(s)).sum())
    return -total / b


def _checked(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    logits = validate_logits(logits)
    y = validate_targets(y, logits.shape[1], logits.shape[2]).to(logits.device)
    return logits, y


def temperature_nll(logits: Tensor, y: Tensor, temperature: float) -> float:
    """NLL of the MC-averaged predictive ``mean_s softmax(logits_s / T)`` at temperature ``T`` (natural log)."""
    logits, y = _checked(logits, y)
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _nll_at(logits.double(), y, float(temperature))


def fit_temperature(logits: Tensor, y: Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature ``T`` in ``bounds`` minimising the NLL of ``mean_s softmax(logits_s / T)`` on ``logits [S, B, C]``, ``y [B]``."""
    logits, y = _checked(logits, y)
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0.0 < lo < hi or not math.isfinite(hi):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds}")
    l64 = logits.double()
    u_lo, u_hi = math.log(lo), math.log(hi)

    def f(u: float) -> float:
        return _nll_at(l64, y, math.exp(u))

    grid = [u_lo + (u_hi - u_lo) * i / (_GRID - 1) for i in range(_GRID)]
    vals = [f(u) for u in grid]
    best = min(range(_GRID), key=lambda i: (vals[i], i))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, _GRID - 1)]
    # Golden-section search on [a, b] in log T; |du| < 1e-7 gives |dT| / T < 1e-6.
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    while b - a > 1e-7:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
    u_best, f_best = (c, fc) if fc <= fd else (d, fd)
    # The bracket may touch a bound: keep the grid point if it is still better (minimum at the bound).
    if vals[best] < f_best:
        u_best = grid[best]
    return float(min(max(math.exp(u_best), lo), hi))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Probabilities ``softmax(logits / T)`` of shape ``[S, B, C]``, in the logits' dtype."""
    logits = validate_logits(logits)
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits / float(temperature), dim=-1)
