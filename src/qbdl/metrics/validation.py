"""Input validation shared by the metrics: MC probabilities ``p [S, B, C]``, targets ``y [B]``, bins, fractions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SUM_TOL", "validate_probs", "validate_targets"]

#: Tolerance on ``|sum_c p_c - 1|`` accepted by the input validation.
SUM_TOL = 1e-3


def validate_probs(p: Tensor, name: str = "p") -> Tensor:
    """Check that ``p`` is a finite ``[S, B, C]`` probability tensor and return it as a tensor."""
    if not isinstance(p, Tensor):
        try:
            p = torch.as_tensor(p)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name} must be a tensor of probabilities, got {type(p).__name__}") from exc
    if p.ndim != 3:
        hint = " (for a deterministic model pass probs.unsqueeze(0), i.e. S = 1)" if p.ndim == 2 else ""
        raise ValueError(f"{name} must have shape [S, B, C], got {p.ndim}-D shape {tuple(p.shape)}{hint}")
    if not p.is_floating_point():
        raise ValueError(f"{name} must be a floating-point probability tensor, got dtype {p.dtype}")
    s, b, c = p.shape
    if s == 0:
        raise ValueError(f"{name} has S = 0 Monte-Carlo samples (shape {tuple(p.shape)}); need S >= 1")
    if b == 0:
        raise ValueError(f"{name} has B = 0 data points (shape {tuple(p.shape)}); need at least one point")
    if c < 2:
        raise ValueError(f"{name} has C = {c} classes (shape {tuple(p.shape)}); need C >= 2")
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} contains NaN or inf values; check the model outputs / softmax")
    if bool((p < 0).any()):
        raise ValueError(
            f"{name} contains negative probabilities (min {float(p.min()):.3g}); apply softmax first"
        )
    sums = p.double().sum(-1)
    worst = float((sums - 1.0).abs().max())
    if worst > SUM_TOL:
        raise ValueError(
            f"{name} does not sum to 1 along the class axis (max |sum - 1| = {worst:.3g} > {SUM_TOL}); "
            "pass probabilities (softmax of the logits), not logits"
        )
    return p


def validate_targets(y: Tensor, batch: int, num_classes: int) -> Tensor:
    """Check that ``y`` is an integer ``[B]`` tensor with values in ``[0, C)`` and return it."""
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    if y.ndim != 1:
        raise ValueError(f"y must have shape [B], got {y.ndim}-D shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}; use y.long()")
    if y.shape[0] != batch:
        raise ValueError(f"shape mismatch: p has B = {batch} points but y has {y.shape[0]} targets")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"targets out of range: y must lie in [0, {num_classes - 1}] for C = {num_classes}, "
            f"got min {int(y.min())}, max {int(y.max())}"
        )
    return y


def check_probs_targets(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Validate probabilities ``p`` and their targets ``y`` together; returns both."""
    p = validate_probs(p)
    y = validate_targets(y, p.shape[1], p.shape[2]).to(p.device)
    return p, y


def check_bins(n_bins: int) -> None:
    """Raise a ValueError unless ``n_bins`` is a positive int."""
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def check_fraction(value: float, name: str, low_open: bool = False) -> float:
    """Return ``value`` as a float after checking it is a fraction in (0, 1] or [0, 1]."""
    v = float(value)
    if not (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0):
        raise ValueError(f"{name} must lie in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return v
