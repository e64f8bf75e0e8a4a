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
SCORE_NAMES = ("entropy", "mi", "maxprob")


def check_score(score: str) -> None:
    """Raise a ValueError naming the choices unless ``score`` is a known uncertainty score."""
    if score not in SCORE_NAMES:
        raise ValueError(f"unknown uncertainty score {score!r}; choose one of {SCORE_NAMES}")


def _entropy(q: Tensor) -> Tensor:
    # xlogy gives 0 * log 0 = 0 without NaNs for saturated predictions.
    return -torch.special.xlogy(q, q).sum(-1)


def entropy_of_mean(p64: Tensor) -> Tensor:
    """Predictive entropy H[pbar] of validated float64 ``[S, B, C]`` probabilities."""
    return _entropy(p64.mean(0))


def mean_entropy(p64: Tensor) -> Tensor:
    """Expected entropy mean_s H[p_s] (aleatoric part) of validated float64 probabilities."""
    return _entropy(p64).mean(0)


def mi_terms(p64: Tensor) -> Tensor:
    """Mutual information H[pbar] - mean_s H[p_s], clamped at 0, of validated float64 probabilities."""
    # Clamp because round-off can make H[pbar] - E[H[p_s]] slightly negative (MI >= 0 by Jensen).
    return (entropy_of_mean(p64) - mean_entropy(p64)).clamp_min(0.0)


def scores_from_probs(p64: Tensor, score: str) -> Tensor:
    """Per-point uncertainty score (larger = more uncertain) of validated float64 probabilities."""
    check_score(score)
    if score == "entropy":
        return entropy_of_mean(p64)
    if score == "mi":
        return mi_terms(p64)
    return 1.0 - p64.mean(0).max(-1).values


def predictive_mean(p: Tensor) -> Tensor:
    """Predictive distribution ``pbar = p.mean(0)`` of shape ``[B, C]``."""
    return validate_probs(p).mean(0)


def predictive_entropy(p: Tensor) -> Tensor:
    """Per-point predictive (total) entropy ``H[pbar]`` in nats, shape ``[B]``, in ``p``'s dtype."""
    p = validate_probs(p)
    return entropy_of_mean(p.double()).to(p.dtype)


def aleatoric_entropy(p: Tensor) -> Tensor:
    """Per-point expected entropy ``mean_s H[p_s]`` (aleatoric part) in nats, shape ``[B]``, in ``p``'s dtype."""
    p = validate_probs(p)
    return mean_entropy(p.double()).to(p.dtype)


def mutual_information(p: Tensor) -> Tensor:
    """Per-point mutual information ``H[pbar] - mean_s H[p_s]`` (clamped >= 0), shape ``[B]``, in ``p``'s dtype."""
    p = validate_probs(p)
    return mi_terms(p.double()).to(p.dtype)


def uncertainty_scores(p: Tensor, score: str = "entropy") -> Tensor:
    """Per-point score (larger = more uncertain) in ``p``'s dtype: ``entropy`` H[pbar], ``mi``, or ``maxprob`` 1 - max pbar."""
    p = validate_probs(p)
    return scores_from_probs(p.double(), score).to(p.dtype)
