"""Calibration errors as fractions in [0, 1]: ECE / MCE (confidence bins), UCE / MUCE, adaptive ECE.

Bin membership of the ECE matches torchmetrics, the adaptive ECE torch-uncertainty; the reliability
and uncertainty-calibration bins are the data of the diagrams.  Conventions: :mod:`qbdl.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qbdl.metrics.scoring import correct_terms
from qbdl.metrics.selective import tie_mean
from qbdl.metrics.uncertainty import entropy_of_mean
from qbdl.metrics.validation import check_bins, check_probs_targets

__all__ = [
    "ReliabilityBins",
    "UncertaintyCalibrationBins",
    "reliability_bins",
    "expected_calibration_error",
    "maximum_calibration_error",
    "uncertainty_calibration_bins",
    "uncertainty_calibration_error",
    "maximum_uncertainty_calibration_error",
    "adaptive_calibration_error",
]


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


def confidence_bin_sums(p: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
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


def ece_from_sums(count: Tensor, conf_sum: Tensor, correct_sum: Tensor) -> float:
    """Expected calibration error from per-bin counts and sums."""
    gap, _ = _gaps(count, conf_sum, correct_sum)
    return float((count / count.sum() * gap).sum())


def max_gap_from_sums(count: Tensor, a_sum: Tensor, b_sum: Tensor) -> float:
    """Largest per-bin gap between two summed quantities (MCE/MUCE) from per-bin sums."""
    gap, nonempty = _gaps(count, a_sum, b_sum)
    return float(gap[nonempty].max())


def reliability_bins(p: Tensor, y: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Reliability-diagram data: ``n_bins`` equal-width ``[lo, hi)`` confidence bins, confidence 1.0 in the last bin."""
    p, y = check_probs_targets(p, y)
    check_bins(n_bins)
    count, conf_sum, corr_sum = confidence_bin_sums(p, y, n_bins)
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
    p, y = check_probs_targets(p, y)
    check_bins(n_bins)
    return ece_from_sums(*confidence_bin_sums(p, y, n_bins))


def maximum_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """MCE: maximum ``|acc(B_m) - conf(B_m)|`` over non-empty confidence bins (same bins as the ECE)."""
    p, y = check_probs_targets(p, y)
    check_bins(n_bins)
    return max_gap_from_sums(*confidence_bin_sums(p, y, n_bins))


def _normalised_uncertainty(p64: Tensor) -> Tensor:
    c = p64.shape[-1]
    return (entropy_of_mean(p64) / math.log(c)).clamp(0.0, 1.0)


def uncertainty_bin_sums(p: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, sum normalised entropy, sum error) per bin; bins ``(lo, hi]``, the first also holds 0."""
    p64 = p.double()
    u = _normalised_uncertainty(p64)
    err = 1.0 - correct_terms(p64, y)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=u.device)
    # right=False gives edges[i-1] < u <= edges[i]; u == 0 would get index -1 and is moved to bin 0.
    idx = (torch.bucketize(u, edges, right=False) - 1).clamp(0, n_bins - 1)
    return tuple(_bin_sums(idx, [torch.ones_like(u), u, err], n_bins))  # type: ignore[return-value]


def uncertainty_calibration_bins(p: Tensor, y: Tensor, n_bins: int = 15) -> UncertaintyCalibrationBins:
    """Uncertainty-calibration-diagram data: per-bin count, mean ``H[pbar]/log C`` and error rate."""
    p, y = check_probs_targets(p, y)
    check_bins(n_bins)
    count, u_sum, err_sum = uncertainty_bin_sums(p, y, n_bins)
    safe = count.clamp_min(1)
    return UncertaintyCalibrationBins(
        edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64),
        count=count.cpu(),
        uncertainty=(u_sum / safe).cpu(),
        error=(err_sum / safe).cpu(),
    )


def uncertainty_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """UCE (Laves et al. 2019): ``sum_m |B_m|/n |err(B_m) - u(B_m)|`` with ``u = H[pbar]/log C``, as a fraction."""
    p, y = check_probs_targets(p, y)
    check_bins(n_bins)
    return ece_from_sums(*uncertainty_bin_sums(p, y, n_bins))


def maximum_uncertainty_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """MUCE: maximum ``|err(B_m) - u(B_m)|`` over non-empty uncertainty bins."""
    p, y = check_probs_targets(p, y)
    check_bins(n_bins)
    return max_gap_from_sums(*uncertainty_bin_sums(p, y, n_bins))


def adaptive_bin_sums_from(conf: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count, sum confidence, sum correct) over ``n_bins`` equal-mass bins of the sorted confidences."""
    n = conf.shape[0]
    conf = conf.double()
    order = torch.sort(conf, stable=True).indices
    c_sorted = conf[order]
    corr_sorted = tie_mean(c_sorted, correct.double()[order])
    # Bin sizes as torch.tensor_split(n_bins): the first n % n_bins bins hold one extra point.
    q, r = divmod(n, n_bins)
    pos = torch.arange(n, device=conf.device)
    big = r * (q + 1)
    idx = torch.where(pos < big, pos // (q + 1), r + (pos - big) // max(q, 1))
    return tuple(_bin_sums(idx, [torch.ones_like(c_sorted), c_sorted, corr_sorted], n_bins))  # type: ignore[return-value]


def adaptive_bin_sums(p: Tensor, y: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Equal-mass bin counts and sums of confidence and correctness for ``p`` ``[S, B, C]`` and ``y``."""
    p64 = p.double()
    return adaptive_bin_sums_from(p64.mean(0).max(-1).values, correct_terms(p64, y), n_bins)


def adaptive_calibration_error(p: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """Adaptive (equal-mass) ECE ``sum_m |B_m|/n |acc(B_m) - conf(B_m)|``, as a fraction.

    Points are sorted by confidence ``max pbar`` and cut into ``n_bins`` consecutive runs whose sizes
    follow ``torch.tensor_split`` (the first ``n % n_bins`` bins hold ``ceil(n / n_bins)`` points, the
    rest ``floor``; empty bins when ``n < n_bins`` are skipped), exactly as torch-uncertainty's
    ``AdaptiveCalibrationError(norm="l1")``.  Tied confidences share their mean correctness, so a tie
    straddling a bin edge does not depend on data order (torch-uncertainty splits it by sort order).
    """
    p, y = check_probs_targets(p, y)
    check_bins(n_bins)
    return ece_from_sums(*adaptive_bin_sums(p, y, n_bins))
