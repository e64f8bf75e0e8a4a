"""Stateful ``torchmetrics.Metric`` wrappers of the pure-function metrics in :mod:`qbdl.metrics` (DDP-syncable).

Every ``update`` takes MC probabilities ``p [S, B, C]`` (plus targets ``y [B]`` where relevant) and
accumulates states registered with ``add_state``: sum states for the decomposable metrics and
``"cat"`` list states for the ranking metrics.  ``compute()`` over several batches equals the pure
function applied to the concatenation of all batches; ties are broken at random in expectation, so
the ranking metrics do not depend on the update (or DDP gather) order either.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from qbdl.metrics.calibration import (
    adaptive_bin_sums_from,
    confidence_bin_sums,
    ece_from_sums,
    max_gap_from_sums,
    uncertainty_bin_sums,
)
from qbdl.metrics.ood import (
    binary_auroc,
)
from qbdl.metrics.scoring import brier_terms, correct_terms, nll_terms
from qbdl.metrics.selective import (
    ReferralCurve,
    curve_augrc,
    curve_aurc,
    curve_coverage_at_risk,
    curve_eaurc,
    curve_from_scores,
    curve_rate_at_accuracy,
    curve_risk_at_coverage,
)
from qbdl.metrics.uncertainty import check_score, mi_terms, scores_from_probs
from qbdl.metrics.validation import check_bins, check_fraction, validate_probs, validate_targets

__all__ = [
    "MCAccuracy",
    "MCNLL",
    "MCBrier",
    "ExpectedCalibrationError",
    "UncertaintyCalibrationError",
    "MeanMutualInformation",
    "ReferralRate",
    "AURC",
    "AUGRC",
    "RiskAtCoverage",
    "CoverageAtRisk",
    "AdaptiveCalibrationError",
    "OODAUROC",
]


def _checked(p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    p = validate_probs(p)
    y = validate_targets(y, p.shape[1], p.shape[2]).to(p.device)
    return p, y


def _zero() -> Tensor:
    return torch.tensor(0.0, dtype=torch.float64)


class _MeanOfTerms(Metric):
    """Running mean of a per-point quantity (sum + count states)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_zero(), dist_reduce_fx="sum")

    def _terms(self, p64: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, p: Tensor, y: Tensor) -> None:
        """Accumulate a batch ``p [S, B, C]``, ``y [B]``."""
        p, y = _checked(p, y)
        terms = self._terms(p.double(), y)
        self.total += terms.sum().to(self.total)
        self.count += terms.numel()

    def compute(self) -> Tensor:
        """Mean over all points seen so far."""
        return self.total / self.count


class MCAccuracy(_MeanOfTerms):
    """Accuracy of ``argmax pbar`` (``pbar = p.mean(0)``)."""

    higher_is_better = True

    def _terms(self, p64: Tensor, y: Tensor) -> Tensor:
        return correct_terms(p64, y)


class MCNLL(_MeanOfTerms):
    """Mean negative log-likelihood of the predictive mean."""

    higher_is_better = False

    def _terms(self, p64: Tensor, y: Tensor) -> Tensor:
        return nll_terms(p64, y)


class MCBrier(_MeanOfTerms):
    """Multi-class Brier score of the predictive mean."""

    higher_is_better = False

    def _terms(self, p64: Tensor, y: Tensor) -> Tensor:
        return brier_terms(p64, y)


class MeanMutualInformation(Metric):
    """Mean (over points) mutual information between prediction and weights; ``update(p)``, ``y`` optional."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=_zero(), dist_reduce_fx="sum")
        self.add_state("count", default=_zero(), dist_reduce_fx="sum")

    def update(self, p: Tensor, y: Tensor | None = None) -> None:
        """Accumulate a batch ``p [S, B, C]``; ``y`` is accepted for a uniform interface and ignored."""
        p = validate_probs(p)
        mi = mi_terms(p.double())
        self.total += mi.sum().to(self.total)
        self.count += mi.numel()

    def compute(self) -> Tensor:
        """Mean mutual information in nats."""
        return self.total / self.count


class _BinnedCalibration(Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _n_buckets_extra = 0

    def __init__(self, n_bins: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        check_bins(n_bins)
        self.n_bins = n_bins
        n = n_bins + self._n_buckets_extra
        for name in ("bin_count", "bin_a", "bin_b"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def _sums(self, p: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def update(self, p: Tensor, y: Tensor) -> None:
        """Accumulate per-bin sums of a batch ``p [S, B, C]``, ``y [B]``."""
        p, y = _checked(p, y)
        count, a, b = self._sums(p, y)
        self.bin_count += count.to(self.bin_count)
        self.bin_a += a.to(self.bin_a)
        self.bin_b += b.to(self.bin_b)

    def compute(self) -> Tensor:
        """Binned calibration error as a fraction in [0, 1]."""
        return torch.tensor(ece_from_sums(self.bin_count, self.bin_a, self.bin_b), dtype=torch.float64)

    def compute_max(self) -> Tensor:
        """Maximum gap over non-empty bins (MCE / MUCE)."""
        return torch.tensor(max_gap_from_sums(self.bin_count, self.bin_a, self.bin_b), dtype=torch.float64)


class ExpectedCalibrationError(_BinnedCalibration):
    """ECE with torchmetrics-compatible confidence bins (``compute_max()`` gives the MCE)."""

    _n_buckets_extra = 1  # the torchmetrics "confidence == 1" bucket

    def _sums(self, p: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return confidence_bin_sums(p, y, self.n_bins)


class UncertaintyCalibrationError(_BinnedCalibration):
    """UCE over normalised predictive entropy ``H[pbar]/log C`` (``compute_max()`` gives the MUCE)."""

    def _sums(self, p: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return uncertainty_bin_sums(p, y, self.n_bins)


class _Ranking(Metric):
    """Stores per-point uncertainty scores and correctness (``cat`` states) for referral metrics."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, score: str = "entropy", **kwargs) -> None:
        super().__init__(**kwargs)
        check_score(score)
        self.score = score
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, p: Tensor, y: Tensor) -> None:
        """Store scores and correctness of a batch ``p [S, B, C]``, ``y [B]``."""
        p, y = _checked(p, y)
        p64 = p.double()
        self.scores.append(scores_from_probs(p64, self.score))
        self.correct.append(correct_terms(p64, y))

    def _curve(self) -> ReferralCurve:
        return curve_from_scores(dim_zero_cat(self.scores), dim_zero_cat(self.correct))


class ReferralRate(_Ranking):
    """Smallest referred fraction reaching retained accuracy ``>= target`` (1.0 if never)."""

    higher_is_better = False

    def __init__(self, target: float = 0.995, score: str = "entropy", **kwargs) -> None:
        super().__init__(score=score, **kwargs)
        if not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"target accuracy must lie in [0, 1], got {target}")
        self.target = float(target)

    def compute(self) -> Tensor:
        """Referral rate at the target accuracy."""
        return torch.tensor(curve_rate_at_accuracy(self._curve(), self.target), dtype=torch.float64)


class AURC(_Ranking):
    """Area under the risk-coverage curve (``compute_excess()`` gives the E-AURC)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        """AURC as a fraction."""
        return torch.tensor(curve_aurc(self._curve()), dtype=torch.float64)

    def compute_excess(self) -> Tensor:
        """E-AURC = AURC - AURC of the oracle ranking."""
        return torch.tensor(curve_eaurc(self._curve()), dtype=torch.float64)


class AUGRC(_Ranking):
    """Area under the generalized risk-coverage curve (Traub et al. 2024), as a fraction."""

    higher_is_better = False

    def compute(self) -> Tensor:
        """AUGRC of all points seen so far."""
        return torch.tensor(curve_augrc(self._curve()), dtype=torch.float64)


class RiskAtCoverage(_Ranking):
    """Selective risk (error rate among accepted points) at a fixed coverage, e.g. 0.8."""

    higher_is_better = False

    def __init__(self, coverage: float = 0.8, score: str = "entropy", **kwargs) -> None:
        super().__init__(score=score, **kwargs)
        self.coverage = check_fraction(coverage, "coverage", low_open=True)

    def compute(self) -> Tensor:
        """Selective risk at ``coverage``."""
        return torch.tensor(curve_risk_at_coverage(self._curve(), self.coverage), dtype=torch.float64)


class CoverageAtRisk(_Ranking):
    """Largest coverage whose selective risk is ``<= risk`` (0 if none)."""

    higher_is_better = True

    def __init__(self, risk: float = 0.05, score: str = "entropy", **kwargs) -> None:
        super().__init__(score=score, **kwargs)
        self.risk = check_fraction(risk, "risk")

    def compute(self) -> Tensor:
        """Coverage at ``risk``."""
        return torch.tensor(curve_coverage_at_risk(self._curve(), self.risk), dtype=torch.float64)


class AdaptiveCalibrationError(Metric):
    """Adaptive (equal-mass bins) ECE of the predictive mean; stores confidences and correctness (``cat``)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_bins: int = 15, **kwargs) -> None:
        super().__init__(**kwargs)
        check_bins(n_bins)
        self.n_bins = n_bins
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, p: Tensor, y: Tensor) -> None:
        """Store ``max pbar`` and correctness of a batch ``p [S, B, C]``, ``y [B]``."""
        p, y = _checked(p, y)
        p64 = p.double()
        self.confidence.append(p64.mean(0).max(-1).values)
        self.correct.append(correct_terms(p64, y))

    def compute(self) -> Tensor:
        """Adaptive calibration error as a fraction in [0, 1]."""
        sums = adaptive_bin_sums_from(dim_zero_cat(self.confidence), dim_zero_cat(self.correct), self.n_bins)
        return torch.tensor(ece_from_sums(*sums), dtype=torch.float64)


class OODAUROC(Metric):
    """OOD-detection AUROC; ``update(p, is_ood)`` with ``is_ood`` a bool for the whole batch or a ``[B]`` bool tensor."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, score: str = "entropy", **kwargs) -> None:
        super().__init__(**kwargs)
        check_score(score)
        self.score = score
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, p: Tensor, is_ood: bool | Tensor) -> None:
        """Store scores of a batch ``p [S, B, C]``; ``is_ood`` marks OOD (positive) points."""
        p = validate_probs(p)
        s = scores_from_probs(p.double(), self.score)
        if isinstance(is_ood, Tensor):
            if is_ood.shape != s.shape:
                raise ValueError(
                    f"is_ood must be a bool or a [B] = [{s.shape[0]}] tensor, got {tuple(is_ood.shape)}"
                )
            lab = is_ood.to(s.device).double()
        else:
            lab = torch.full_like(s, float(bool(is_ood)))
        self.scores.append(s)
        self.labels.append(lab)

    def compute(self) -> Tensor:
        """AUROC with OOD as the positive class."""
        return torch.tensor(
            binary_auroc(dim_zero_cat(self.scores), dim_zero_cat(self.labels)), dtype=torch.float64
        )
