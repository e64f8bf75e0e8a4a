"""Accuracy and the proper scoring rules (NLL, Brier) of the predictive mean ``pbar = p.mean(0)``."""

from __future__ import annotations

import torch
from torch import Tensor

from qbdl.metrics.validation import check_probs_targets

__all__ = ["EPS", "accuracy", "nll", "brier"]

#: Probabilities are clamped at this value before taking ``log`` in the NLL.
EPS = 1e-12


def correct_terms(p64: Tensor, y: Tensor) -> Tensor:
    """Per-point 1.0/0.0 for a correct top-1 of the mean prediction (validated float64 ``[S, B, C]``)."""
    return (p64.mean(0).argmax(-1) == y).double()


def accuracy(p: Tensor, y: Tensor) -> float:
    """Fraction of points whose ``argmax pbar`` equals the target (first maximal class wins ties)."""
    p, y = check_probs_targets(p, y)
    return float(correct_terms(p.double(), y).mean())


def nll_terms(p64: Tensor, y: Tensor) -> Tensor:
    """Per-point negative log-likelihood of the mean prediction (validated float64 ``[S, B, C]``)."""
    pbar = p64.mean(0)
    return -pbar.gather(1, y.long().unsqueeze(1)).squeeze(1).clamp_min(EPS).log()


def brier_terms(p64: Tensor, y: Tensor) -> Tensor:
    """Per-point Brier score of the mean prediction (validated float64 ``[S, B, C]``)."""
    pbar = p64.mean(0)
    onehot = torch.nn.functional.one_hot(y.long(), pbar.shape[1]).double()
    return ((pbar - onehot) ** 2).sum(-1)


def nll(p: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood ``-log pbar[y]`` (probabilities clamped at ``EPS``)."""
    p, y = check_probs_targets(p, y)
    return float(nll_terms(p.double(), y).mean())


def brier(p: Tensor, y: Tensor) -> float:
    """Multi-class Brier score: mean over points of ``sum_c (pbar_c - onehot_c)^2`` (range [0, 2])."""
    p, y = check_probs_targets(p, y)
    return float(brier_terms(p.double(), y).mean())
