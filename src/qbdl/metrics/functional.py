"""Pure-function uncertainty, calibration and selective-prediction metrics (OOD detection: qbdl.metrics.ood).

Conventions
-----------
* ``p`` holds Monte-Carlo class probabilities of shape ``[S, B, C]`` (``S`` samples, ``B`` points,
  ``C >= 2`` classes); a deterministic model uses ``S = 1`` (pass ``probs.unsqueeze(0)``).  A 2-D
  ``[B, C]`` tensor is rejected on purpose, so that ``[S, C]`` mix-ups cannot pass silently.
* ``y`` holds integer targets of shape ``[B]`` in ``[0, C)``.
* The predictive distribution is ``pbar = p.mean(0)``; logarithms are natural.
* Scalar metrics are returned as Python floats, per-point quantities as tensors.
* Calibration errors (ECE, MCE, UCE, MUCE) are **fractions in [0, 1]**; multiplying by 100 for
  reporting in percent is the caller's job.
* Uncertainty scores are oriented so that *larger means more uncertain*.
* Per-point quantities (entropies, MI, scores) are returned in the input's floating dtype, as in
  torchmetrics' functional API; the maths inside runs in float64.
* Ties in a ranking (equal scores or confidences) are broken *at random in expectation*: inside each
  run of equal values every position gets the run's mean correctness, so referral / risk-coverage
  curves are the expectation over all orderings of the tied points and do not depend on data order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "ReliabilityBins",
    "UncertaintyCalibrationBins",
    "ReferralCurve",
    "validate_probs",
    "validate_targets",
    "predictive_mean",
    "uncertainty_scores",
    "accuracy",
    "nll",
    "brier",
    "predictive_entropy",
    "aleatoric_entropy",
    "mutual_information",
    "reliability_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "uncertainty_calibration_bins",
    "uncertainty_calibration_error",
    "maximum_uncertainty_calibration_error",
    "referral_curve",
    "referral_rate_at_accuracy",
    "referral_auc",
    "aurc",
    "eaurc",
    "augrc",
    "risk_at_coverage",
    "coverage_at_risk",
    "adaptive_calibration_error",
]

#: Probabilities are clamped at this value before taking ``log`` in the NLL.
EPS = 1e-12
#: Tolerance on ``|sum_c p_c - 1|`` accepted by the input validation.
SUM_TOL = 1e-3

Score = Literal["entropy", "mi", "maxprob"]
_SCORES = ("entropy", "mi", "maxprob")


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
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


def _check(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    p = validate_probs(p)
    y = validate_targets(y, p.shape[1], p.shape[2]).to(p.device)
    return p, y


def _check_score(score: str) -> None:
    if score not in _SCORES:
        raise ValueError(f"unknown uncertainty score {score!r}; choose one of {_SCORES}")


# --------------------------------------------------------------------------------------------------
# entropies and scores (unchecked helpers work on validated input, in float64)
# --------------------------------------------------------------------------------------------------
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


def _correct(p64: Tensor, y: Tensor) -> Tensor:
    return (p64.mean(0).argmax(-1) == y).double()


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


# --------------------------------------------------------------------------------------------------
# accuracy, NLL, Brier
# --------------------------------------------------------------------------------------------------
def accuracy(p: Tensor, y: Tensor) -> float:
    """Fraction of points whose ``argmax pbar`` equals the target (first maximal class wins ties)."""
    p, y = _check(p, y)
    return float(_correct(p.double(), y).mean())


def _nll_terms(p64: Tensor, y: Tensor) -> Tensor:
    pbar = p64.mean(0)
    return -pbar.gather(1, y.long().unsqueeze(1)).squeeze(1).clamp_min(EPS).log()


def _brier_terms(p64: Tensor, y: Tensor) -> Tensor:
    pbar = p64.mean(0)
    onehot = torch.nn.functional.one_hot(y.long(), pbar.shape[1]).double()
    return ((pbar - onehot) ** 2).sum(-1)


def nll(p: Tensor, y: Tensor) -> float:
    """Mean negative log-likelihood ``-log pbar[y]`` (probabilities clamped at ``EPS``)."""
    p, y = _check(p, y)
    return float(_nll_terms(p.double(), y).mean())


def brier(p: Tensor, y: Tensor) -> float:
    """Multi-class Brier score: mean over points of ``sum_c (pbar_c - onehot_c)^2`` (range [0, 2])."""
    p, y = _check(p, y)
    return float(_brier_terms(p.double(), y).mean())


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------
@dataclass
class ReliabilityBins:
    """Per-bin data of a reliability diagram (``n_bins`` equal-width confidence bins on [0, 1])."""

    edges: Tensor  # [n_bins + 1]
    count: Tensor  # [n_bins], number of points per bin
    confidence: Tensor  # [n_bins], mean confidence (0 for empty bins)
    accuracy: Tensor  # [n_bins], accuracy (0 for empty bins)


@dataclass
class UncertaintyCalibrationBins:
    """Per-bin data of an uncertainty-calibration diagram (``n_bins`` equal-width bins of ``H/log C``)."""

    edges: Tensor  # [n_bins + 1]
    count: Tensor  # [n_bins]
    uncertainty: Tensor  # [n_bins], mean normalised entropy (0 for empty bins)
    error: Tensor  # [n_bins], error rate (0 for empty bins)


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def _confidence_bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Bucket index exactly as torchmetrics' ``_binning_bucketize``.

    Bins are ``[lo, hi)`` with float32 ``linspace`` edges; a confidence of exactly 1.0 lands in an
    extra bucket ``n_bins`` (as in torchmetrics), so there are ``n_bins + 1`` buckets.
    """
    conf32 = conf.float()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float32, device=conf.device)
    return torch.bucketize(conf32, edges, right=True) - 1


def _bin_sums(index: Tensor, values: list[Tensor], n_buckets: int) -> list[Tensor]:
    out = []
    for v in values:
        acc = torch.zeros(n_buckets, dtype=torch.float64, device=v.device)
        acc.scatter_add_(0, index, v.double())
        out.append(acc)
    return out


def _confidence_bin_sums(p: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, sum confidence, sum correct) per torchmetrics bucket (``n_bins + 1`` buckets)."""
    # Bucketing uses pbar in the input dtype and float32 confidences so that bin membership is
    # bit-identical to torchmetrics.MulticlassCalibrationError fed with p.mean(0).
    pbar = p.mean(0)
    conf, pred = pbar.max(-1)
    idx = _confidence_bin_index(conf, n_bins)
    correct = (pred == y).double()
    return tuple(_bin_sums(idx, [torch.ones_like(correct), conf.float(), correct], n_bins + 1))  # type: ignore[return-value]


def _gaps(count: Tensor, sum_a: Tensor, sum_b: Tensor) -> tuple[Tensor, Tensor]:
    nonempty = count > 0
    safe = count.clamp_min(1)
    gap = ((sum_a - sum_b) / safe).abs()
    return gap, nonempty


def _ece_from_sums(count: Tensor, conf_sum: Tensor, correct_sum: Tensor) -> float:
    gap, _ = _gaps(count, conf_sum, correct_sum)
    return float((count / count.sum() * gap).sum())


def _max_from_sums(count: Tensor, a_sum: Tensor, b_sum: Tensor) -> float:
    gap, nonempty = _gaps(count, a_sum, b_sum)
    return float(gap[nonempty].max())


def reliability_bins(p: Tensor, y: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Reliability-diagram data: ``n_bins`` equal-width ``[lo, hi)`` confidence bins, confidence 1.0 in the last bin."""
    p, y = _check(p, y)
    _check_bins(n_bins)
    count, conf_sum, corr_sum = _confidence_bin_sums(p, y, n_bins)
    # For display, fold the degenerate "confidence == 1" bucket into the last regular bin.
    count = torch.cat([count[:-2], count[-2:].sum(0, keepdim=True)])
    conf_sum = torch.cat([conf_sum[:-2], conf_sum[-2:].sum(0, keepdim=True)])
    corr_sum = torch.cat([corr_sum[:-2], corr_sum[-2:].sum(0, keepdim=True)])
    safe = count.clamp_min(1)
    return ReliabilityBins(
        edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64),
        count=count.cpu(),
        confidence=(conf_sum / safe).cpu(),
        accuracy=(corr_sum / safe).cpu(),
    )


def expected_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """ECE ``sum_m |B_m|/n |acc(B_m) - conf(B_m)|`` over equal-width confidence bins, as a fraction.

    Bin membership matches ``torchmetrics.classification.MulticlassCalibrationError(norm="l1")``:
    bins are ``[lo, hi)`` and points with confidence exactly 1.0 form their own bucket.
    """
    p, y = _check(p, y)
    _check_bins(n_bins)
    return _ece_from_sums(*_confidence_bin_sums(p, y, n_bins))


def maximum_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """MCE: maximum ``|acc(B_m) - conf(B_m)|`` over non-empty confidence bins (same bins as the ECE)."""
    p, y = _check(p, y)
    _check_bins(n_bins)
    return _max_from_sums(*_confidence_bin_sums(p, y, n_bins))


def _normalised_uncertainty(p64: Tensor) -> Tensor:
    c = p64.shape[-1]
    return (_pred_entropy(p64) / math.log(c)).clamp(0.0, 1.0)


def _uncertainty_bin_sums(p: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, sum normalised entropy, sum error) per bin; bins ``(lo, hi]``, the first also holds 0."""
    p64 = p.double()
    u = _normalised_uncertainty(p64)
    err = 1.0 - _correct(p64, y)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=u.device)
    # right=False gives edges[i-1] < u <= edges[i]; u == 0 would get index -1 and is moved to bin 0.
    idx = (torch.bucketize(u, edges, right=False) - 1).clamp(0, n_bins - 1)
    return tuple(_bin_sums(idx, [torch.ones_like(u), u, err], n_bins))  # type: ignore[return-value]


def uncertainty_calibration_bins(p: Tensor, y: Tensor, n_bins: int = 15) -> UncertaintyCalibrationBins:
    """Uncertainty-calibration-diagram data: per-bin count, mean ``H[pbar]/log C`` and error rate."""
    p, y = _check(p, y)
    _check_bins(n_bins)
    count, u_sum, err_sum = _uncertainty_bin_sums(p, y, n_bins)
    safe = count.clamp_min(1)
    return UncertaintyCalibrationBins(
        edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64),
        count=count.cpu(),
        uncertainty=(u_sum / safe).cpu(),
        error=(err_sum / safe).cpu(),
    )


def uncertainty_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """UCE (Laves et al. 2019): ``sum_m |B_m|/n |err(B_m) - u(B_m)|`` with ``u = H[pbar]/log C``, as a fraction."""
    p, y = _check(p, y)
    _check_bins(n_bins)
    return _ece_from_sums(*_uncertainty_bin_sums(p, y, n_bins))


def maximum_uncertainty_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """MUCE: maximum ``|err(B_m) - u(B_m)|`` over non-empty uncertainty bins."""
    p, y = _check(p, y)
    _check_bins(n_bins)
    return _max_from_sums(*_uncertainty_bin_sums(p, y, n_bins))


# --------------------------------------------------------------------------------------------------
# selective prediction (referral)
# --------------------------------------------------------------------------------------------------
@dataclass
class ReferralCurve:
    """Retained accuracy as a function of the referred fraction, with oracle and random references."""

    fraction_referred: Tensor  # [n]: k / n for k = 0 .. n-1 referred points
    accuracy: Tensor  # [n]: accuracy on the n - k retained points
    oracle_accuracy: Tensor  # [n]: errors referred first
    random_accuracy: Tensor  # [n]: random referral, constant = overall accuracy


def _tie_mean(sorted_keys: Tensor, values: Tensor) -> Tensor:
    """Replace every value by the mean of the values sharing its (already sorted) key: ties in expectation."""
    _, inverse, counts = torch.unique_consecutive(sorted_keys, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64, device=values.device)
    sums.scatter_add_(0, inverse, values.double())
    return (sums / counts.double())[inverse]


def _referral_from_scores(scores: Tensor, correct: Tensor) -> ReferralCurve:
    """Referral curve from per-point scores (larger = refer first) and 0/1 correctness.

    Ties: expected value under uniformly random tie-breaking.  Within each run of equal scores every
    position gets the run's mean correctness, so the accuracy at each ``k`` is the mean over all
    orderings of the tied points, and the curve does not depend on the data order.
    """
    n = scores.shape[0]
    s64 = scores.double()
    order = torch.sort(s64, descending=True, stable=True).indices
    c_sorted = _tie_mean(s64[order], correct.double()[order])
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
    p, y = _check(p, y)
    p64 = p.double()
    return _referral_from_scores(_scores(p64, score), _correct(p64, y))


def _rate_at_accuracy(curve: ReferralCurve, target: float) -> float:
    # Tiny slack so that e.g. 199/200 counts as reaching a target of 0.995 despite round-off.
    hit = torch.nonzero(curve.accuracy >= target - 1e-12)
    return float(curve.fraction_referred[hit[0, 0]]) if hit.numel() else 1.0


def referral_rate_at_accuracy(p: Tensor, y: Tensor, target: float, score: str = "entropy") -> float:
    """Smallest referred fraction at which the retained accuracy is ``>= target`` (1.0 if never reached)."""
    if not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"target accuracy must lie in [0, 1], got {target}")
    return _rate_at_accuracy(referral_curve(p, y, score), float(target))


def _referral_auc(curve: ReferralCurve) -> float:
    return float(curve.accuracy.mean())


def referral_auc(p: Tensor, y: Tensor, score: str = "entropy") -> float:
    """Area under the referral curve: mean retained accuracy over the grid ``k/n`` (Riemann sum, step 1/n)."""
    return _referral_auc(referral_curve(p, y, score))


def _aurc(curve: ReferralCurve) -> float:
    return float((1.0 - curve.accuracy).mean())


def _eaurc(curve: ReferralCurve) -> float:
    return float((curve.oracle_accuracy - curve.accuracy).mean())


def aurc(p: Tensor, y: Tensor, score: str = "entropy") -> float:
    """AURC (Geifman & El-Yaniv): selective risk averaged over coverages ``n/n, (n-1)/n, .., 1/n``; equals 1 - referral_auc."""
    return _aurc(referral_curve(p, y, score))


def eaurc(p: Tensor, y: Tensor, score: str = "entropy") -> float:
    """Excess AURC: ``AURC - AURC`` of the oracle ranking (errors rejected first); 0 for a perfect ranking."""
    return _eaurc(referral_curve(p, y, score))


def _augrc(curve: ReferralCurve) -> float:
    # Generalized risk at coverage m/n = (#errors among the m accepted) / n, for m = n .. 1, plus (0, 0).
    n = curve.accuracy.shape[0]
    m = torch.arange(n, 0, -1, dtype=torch.float64)
    g = (1.0 - curve.accuracy) * m / n
    # Trapezoid rule on the grid m/n, m = 0 .. n, with g(0) = 0: (sum_{m=1}^{n} g_m - g_n / 2) / n.
    return float((g.sum() - g[0] / 2) / n)


def _check_fraction(value: float, name: str, low_open: bool = False) -> float:
    v = float(value)
    if not (0.0 < v <= 1.0 if low_open else 0.0 <= v <= 1.0):
        raise ValueError(f"{name} must lie in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return v


def _risk_at_coverage(curve: ReferralCurve, coverage: float) -> float:
    n = curve.accuracy.shape[0]
    # Accept the ceil(c n) most confident points (torch-uncertainty's RiskAtxCov convention); the tiny
    # slack keeps e.g. 0.95 * 100 = 95.00000000000001 at 95 points.
    m = min(n, max(1, math.ceil(coverage * n - 1e-9)))
    return float(1.0 - curve.accuracy[n - m])


def _coverage_at_risk(curve: ReferralCurve, risk: float) -> float:
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
    return _augrc(referral_curve(p, y, score))


def risk_at_coverage(p: Tensor, y: Tensor, coverage: float, score: str = "entropy") -> float:
    """Selective risk (error rate among accepted points) when the ``ceil(coverage n)`` least uncertain points are accepted."""
    return _risk_at_coverage(
        referral_curve(p, y, score), _check_fraction(coverage, "coverage", low_open=True)
    )


def coverage_at_risk(p: Tensor, y: Tensor, risk: float, score: str = "entropy") -> float:
    """Largest coverage ``m/n`` whose selective risk is ``<= risk`` (0.0 if none), ranking by the uncertainty score."""
    return _coverage_at_risk(referral_curve(p, y, score), _check_fraction(risk, "risk"))


# --------------------------------------------------------------------------------------------------
# adaptive (equal-mass) calibration error
# --------------------------------------------------------------------------------------------------
def _adaptive_bin_sums_from(conf: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, sum confidence, sum correct) over ``n_bins`` equal-mass bins of the sorted confidences."""
    n = conf.shape[0]
    conf = conf.double()
    order = torch.sort(conf, stable=True).indices
    c_sorted = conf[order]
    corr_sorted = _tie_mean(c_sorted, correct.double()[order])
    # Bin sizes as torch.tensor_split(n_bins): the first n % n_bins bins hold one extra point.
    q, r = divmod(n, n_bins)
    pos = torch.arange(n, device=conf.device)
    big = r * (q + 1)
    idx = torch.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1))
    return tuple(_bin_sums(idx, [torch.ones_like(c_sorted), c_sorted, corr_sorted], n_bins))  # type: ignore[return-value]


def _adaptive_bin_sums(p: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    p64 = p.double()
    return _adaptive_bin_sums_from(p64.mean(0).max(-1).values, _correct(p64, y), n_bins)


def adaptive_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Adaptive (equal-mass) ECE ``sum_m |B_m|/n |acc(B_m) - conf(B_m)|``, as a fraction.

    Points are sorted by confidence ``max pbar`` and cut into ``n_bins`` consecutive runs whose sizes
    follow ``torch.tensor_split`` (the first ``n % n_bins`` bins hold ``ceil(n / n_bins)`` points, the
    rest ``floor``; empty bins when ``n < n_bins`` are skipped), exactly as torch-uncertainty's
    ``AdaptiveCalibrationError(norm="l1")``.  Tied confidences share their mean correctness, so a tie
    straddling a bin edge does not depend on data order (torch-uncertainty splits it by sort order).
    """
    p, y = _check(p, y)
    _check_bins(n_bins)
    return _ece_from_sums(*_adaptive_bin_sums(p, y, n_bins))
