"""Per-point uncertainty: predictive entropy, its aleatoric part, mutual information and the ranking scores.

Scores are oriented so that *larger means more uncertain*; per-point quantities come back in the
input's floating dtype (the maths runs in float64).  Conventions: :mod:`qbdl.metrics`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from qbdl.metrics.validation import validate_probs

__all__ = [
    "predictive_mean",
    "predictive_entropy",
    "aleatoric_entropy",
    "mutual_information",
    "uncertainty_scores",
]

Score = Literal["entropy", "mi", "maxprob"]
_SCORES = ("entropy", "mi", "maxprob")


def _check_score(score: str) -> None:
    if score not in _SCORES:
        raise ValueError(f"unknown uncertainty score {score!r}; choose one of {_SCORES}")


def _entropy(q: Tensor) -> Tensor:
    # xlogy gives 0 * log 0 = 0 without NaNs for saturated predictions.
    return -torch.special.xlogy(q, q).sum(-1)


def _pred_entropy(p64: Tensor) -> Tensor:
    return _entropy(p64.mean(0))


def _aleatoric(p64: Tensor) -> Tensor:
    return _entropy(p64).mean(0)


def _mi(p64: Tensor) -> Tensor:
    # Clamp because round-off can make H[pbar] - E[H[p_s]] slightly negative (MI >= 0 by Jensen).
    return (_pred_entropy(p64) - _aleatoric(p64)).clamp_min(0.0)


def _scores(p64: Tensor, score: str) -> Tensor:
    _check_score(score)
    if score == "entropy":
        return _pred_entropy(p64)
    if score == "mi":
        return _mi(p64)
    return 1.0 - p64.mean(0).max(-1).values


def predictive_mean(p: Tensor) -> Tensor:
    """Predictive distribution ``pbar = p.mean(0)`` of shape ``[B, C]``."""
    return validate_probs(p).mean(0)


def predictive_entropy(p: Tensor) -> Tensor:
    """Per-point predictive (total) entropy ``H[pbar]`` in nats, shape ``[B]``, in ``p``'s dtype."""
    p = validate_probs(p)
    return _pred_entropy(p.double()).to(p.dtype)


def aleatoric_entropy(p: Tensor) -> Tensor:
    """Per-point expected entropy ``mean_s H[p_s]`` (aleatoric part) in nats, shape ``[B]``, in ``p``'s dtype."""
    p = validate_probs(p)
    return _aleatoric(p.double()).to(p.dtype)


def mutual_information(p: Tensor) -> Tensor:
    """Per-point mutual information ``H[pbar] - mean_s H[p_s]`` (clamped >= 0), shape ``[B]``, in ``p``'s dtype."""
    p = validate_probs(p)
    return _mi(p.double()).to(p.dtype)


def uncertainty_scores(p: Tensor, score: str = "entropy") -> Tensor:
    """Per-point score (larger = more uncertain) in ``p``'s dtype: ``entropy`` H[pbar], ``mi``, or ``maxprob`` 1 - max pbar."""
    p = validate_probs(p)
    return _scores(p.double(), score).to(p.dtype)
