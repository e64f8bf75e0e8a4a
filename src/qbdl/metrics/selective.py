"""Selective prediction: the referral curve and its summaries (referral rate, AURC, E-AURC, AUGRC, risk / coverage).

Points are ranked by an uncertainty score (larger = referred first); ties are broken at random in
expectation, so the curves do not depend on data order.  Conventions: :mod:`qbdl.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qbdl.metrics.scoring import correct_terms
from qbdl.metrics.uncertainty import scores_from_probs
from qbdl.metrics.validation import check_fraction, check_probs_targets

__all__ = [
    "ReferralCurve",
    "referral_curve",
    "referral_rate_at_accuracy",
    "referral_auc",
    "aurc",
    "eaurc",
    "augrc",
    "risk_at_coverage",
    "coverage_at_risk",
]


@dataclass
class ReferralCurve:
    """Retained accuracy as a function of the referred fraction, with oracle and random references."""

    fraction_referred: Tensor  # [n]: k / n for k = 0 .. n-1 referred points
    accuracy: Tensor  # [n]: accuracy on the n - k retained points
    oracle_accuracy: Tensor  # [n]: errors referred first
    random_accuracy: Tensor  # [n]: random referral, constant = overall accuracy


def tie_mean(sorted_keys: Tensor, values: Tensor) -> Tensor:
    """Replace every value by the mean of the values sharing its (already sorted) key: ties in expectation."""
    _, inverse, counts = torch.unique_consecutive(sorted_keys, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64, device=values.device)
    sums.scatter_add_(0, inverse, values.double())
    return (sums / counts.double())[inverse]


def curve_from_scores(scores: Tensor, correct: Tensor) -> ReferralCurve:
    """Referral curve from per-point scores (larger = refer first) and 0/1 correctness.

    Ties: expected value under uniformly random tie-breaking.  Within each run of equal scores every
    position gets the run's mean correctness, so the accuracy at each ``k`` is the mean over all
    orderings of the tied points, and the curve does not depend on the data order.
    """
    n = scores.shape[0]
    s64 = scores.double()
    order = torch.sort(s64, descending=True, stable=True).indices
    c_sorted = tie_mean(s64[order], correct.double()[order])
    total = correct.double().sum()
    k = torch.arange(n, dtype=torch.float64, device=scores.device)
    referred_correct = torch.cat([c_sorted.new_zeros(1), torch.cumsum(c_sorted, 0)[:-1]])
    retained = n - k
    acc = ((total - referred_correct) / retained).clamp(0.0, 1.0)
    oracle = (total / retained).clamp(max=1.0)
    rand = torch.full_like(acc, float(total / n))
    return ReferralCurve(
        fraction_referred=(k / n).cpu(),
        accuracy=acc.cpu(),
        oracle_accuracy=oracle.cpu(),
        random_accuracy=rand.cpu(),
    )


def referral_curve(p: Tensor, y: Tensor, score: str = "entropy") -> ReferralCurve:
    """Retained accuracy after referring the ``k`` most uncertain points, ``k = 0 .. n-1`` (ties: random in expectation)."""
    p, y = check_probs_targets(p, y)
    p64 = p.double()
    return curve_from_scores(scores_from_probs(p64, score), correct_terms(p64, y))


def curve_rate_at_accuracy(curve: ReferralCurve, target: float) -> float:
    """Smallest referral rate of ``curve`` at which the retained accuracy reaches ``target``."""
    # Tiny slack so that e.g. 199/200 counts as reaching a target of 0.995 despite round-off.
    hit = torch.nonzero(curve.accuracy >= target - 1e-12)
    return float(curve.fraction_referred[hit[0, 0]]) if hit.numel() else 1.0


def referral_rate_at_accuracy(p: Tensor, y: Tensor, target: float, score: str = "entropy") -> float:
    """Smallest referred fraction at which the retained accuracy is ``>= target`` (1.0 if never reached)."""
    if not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"target accuracy must lie in [0, 1], got {target}")
    return curve_rate_at_accuracy(referral_curve(p, y, score), float(target))


def curve_referral_auc(curve: ReferralCurve) -> float:
    """Area under the accuracy-vs-referral curve ``curve``."""
    return float(curve.accuracy.mean())


def referral_auc(p: Tensor, y: Tensor, score: str = "entropy") -> float:
    """Area under the referral curve: mean retained accuracy over the grid ``k/n`` (Riemann sum, step 1/n)."""
    return curve_referral_auc(referral_curve(p, y, score))


def curve_aurc(curve: ReferralCurve) -> float:
    """Area under the risk-coverage curve of ``curve``."""
    return float((1.0 - curve.accuracy).mean())


def curve_eaurc(curve: ReferralCurve) -> float:
    """Excess AURC of ``curve`` over its oracle ranking."""
    return float((curve.oracle_accuracy - curve.accuracy).mean())


def aurc(p: Tensor, y: Tensor, score: str = "entropy") -> float:
    """AURC (Geifman & El-Yaniv): selective risk averaged over coverages ``n/n, (n-1)/n, .., 1/n``; equals 1 - referral_auc."""
    return curve_aurc(referral_curve(p, y, score))


def eaurc(p: Tensor, y: Tensor, score: str = "entropy") -> float:
    """Excess AURC: ``AURC - AURC`` of the oracle ranking (errors rejected first); 0 for a perfect ranking."""
    return curve_eaurc(referral_curve(p, y, score))


def curve_augrc(curve: ReferralCurve) -> float:
    """Area under the generalized risk-coverage curve of ``curve`` (Traub et al. 2024)."""
    # Generalized risk at coverage m/n = (#errors among the m accepted) / n, for m = n .. 1, plus (0, 0).
    n = curve.accuracy.shape[0]
    m = torch.arange(n, 0, -1, dtype=torch.float64)
    g = (1.0 - curve.accuracy) * m / n
    # Trapezoid rule on the grid m/n, m = 0 .. n, with g(0) = 0: (sum_{m=1}^{n} g_m - g_n / 2) / n.
    return float((g.sum() - g[0] / 2) / n)


def curve_risk_at_coverage(curve: ReferralCurve, coverage: float) -> float:
    """Selective risk of ``curve`` at the given coverage."""
    n = curve.accuracy.shape[0]
    # Accept the ceil(c n) most confident points (torch-uncertainty's RiskAtxCov convention); the tiny
    # slack keeps e.g. 0.95 * 100 = 95.00000000000001 at 95 points.
    m = min(n, max(1, math.ceil(coverage * n - 1e-9)))
    return float(1.0 - curve.accuracy[n - m])


def curve_coverage_at_risk(curve: ReferralCurve, risk: float) -> float:
    """Largest coverage of ``curve`` whose selective risk is at most ``risk``."""
    n = curve.accuracy.shape[0]
    hit = torch.nonzero((1.0 - curve.accuracy) <= risk + 1e-12)
    return float(n - hit[0, 0]) / n if hit.numel() else 0.0


def augrc(p: Tensor, y: Tensor, score: str = "entropy") -> float:
    """AUGRC (Traub et al. 2024): area under generalized risk ``#errors accepted / n`` vs coverage, trapezoid from (0, 0).

    The curve joins the points at coverages ``m/n`` (``m = 0 .. n``) linearly; ties are broken at random
    in expectation, which equals linear interpolation between distinct-threshold points as in the
    paper's reference code (fd-shifts, without its x1000 display scale).  Equivalently
    ``AUGRC = (1 - AUROC_f) acc (1 - acc) + (1 - acc)^2 / 2`` with ``AUROC_f`` the failure-detection AUROC.
    """
    return curve_augrc(referral_curve(p, y, score))


def risk_at_coverage(p: Tensor, y: Tensor, coverage: float, score: str = "entropy") -> float:
    """Selective risk (error rate among accepted points) when the ``ceil(coverage n)`` least uncertain points are accepted."""
    return curve_risk_at_coverage(
        referral_curve(p, y, score), check_fraction(coverage, "coverage", low_open=True)
    )


def coverage_at_risk(p: Tensor, y: Tensor, risk: float, score: str = "entropy") -> float:
    """Largest coverage ``m/n`` whose selective risk is ``<= risk`` (0.0 if none), ranking by the uncertainty score."""
    return curve_coverage_at_risk(referral_curve(p, y, score), check_fraction(risk, "risk"))
