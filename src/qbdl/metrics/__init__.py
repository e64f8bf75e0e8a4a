"""Uncertainty, calibration, selective-prediction and OOD metrics for MC predictions ``p [S, B, C]``.

Modules: :mod:`~qbdl.metrics.validation` (input checks), :mod:`~qbdl.metrics.uncertainty` (entropies,
MI, scores), :mod:`~qbdl.metrics.scoring` (accuracy, NLL, Brier), :mod:`~qbdl.metrics.calibration`
(ECE, MCE, UCE, adaptive ECE), :mod:`~qbdl.metrics.selective` (referral curve, AURC, AUGRC, risk /
coverage), :mod:`~qbdl.metrics.ood` (OOD detection, OpenOOD v1.5 protocol),
:mod:`~qbdl.metrics.temperature` (temperature scaling), :mod:`~qbdl.metrics.classes` (torchmetrics
wrappers), :mod:`~qbdl.metrics.summary` (``summarize``) and :mod:`~qbdl.metrics.registry` (every
metric's label, display scale and better direction, for the tables and reports).
This package depends only on torch and torchmetrics (no lightning / hydra / omegaconf).

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

from qbdl.metrics.calibration import (
    ReliabilityBins,
    UncertaintyCalibrationBins,
    adaptive_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    maximum_uncertainty_calibration_error,
    reliability_bins,
    uncertainty_calibration_bins,
    uncertainty_calibration_error,
)
from qbdl.metrics.classes import (
    AUGRC,
    AURC,
    MCNLL,
    OODAUROC,
    AdaptiveCalibrationError,
    CoverageAtRisk,
    ExpectedCalibrationError,
    MCAccuracy,
    MCBrier,
    MeanMutualInformation,
    ReferralRate,
    RiskAtCoverage,
    UncertaintyCalibrationError,
)
from qbdl.metrics.ood import (
    LOGIT_SCORES,
    OOD_METRIC_KEYS,
    OOD_SCORES,
    binary_auroc,
    binary_average_precision,
    binary_fpr_at_tpr,
    binary_roc_curve,
    logit_scores,
    ood_aupr,
    ood_auroc,
    ood_detection_metrics,
    ood_fpr_at_tpr,
    ood_metrics,
    ood_roc_curve,
    ood_scores,
    validate_logits,
)
from qbdl.metrics.registry import MetricSpec, find_metric, metric_spec
from qbdl.metrics.scoring import (
    EPS,
    accuracy,
    brier,
    nll,
)
from qbdl.metrics.selective import (
    ReferralCurve,
    augrc,
    aurc,
    coverage_at_risk,
    eaurc,
    referral_auc,
    referral_curve,
    referral_rate_at_accuracy,
    risk_at_coverage,
)
from qbdl.metrics.summary import OOD_KEYS, SUMMARY_KEYS, summarize
from qbdl.metrics.temperature import apply_temperature, fit_temperature, temperature_nll
from qbdl.metrics.uncertainty import (
    aleatoric_entropy,
    mutual_information,
    predictive_entropy,
    predictive_mean,
    uncertainty_scores,
)
from qbdl.metrics.validation import (
    validate_probs,
    validate_targets,
)

__all__ = [
    "AUGRC",
    "AURC",
    "AdaptiveCalibrationError",
    "CoverageAtRisk",
    "EPS",
    "ExpectedCalibrationError",
    "LOGIT_SCORES",
    "MCAccuracy",
    "MCBrier",
    "MCNLL",
    "MeanMutualInformation",
    "MetricSpec",
    "OODAUROC",
    "OOD_KEYS",
    "OOD_METRIC_KEYS",
    "OOD_SCORES",
    "ReferralCurve",
    "ReferralRate",
    "ReliabilityBins",
    "RiskAtCoverage",
    "SUMMARY_KEYS",
    "UncertaintyCalibrationBins",
    "UncertaintyCalibrationError",
    "accuracy",
    "adaptive_calibration_error",
    "aleatoric_entropy",
    "apply_temperature",
    "augrc",
    "aurc",
    "binary_auroc",
    "binary_average_precision",
    "binary_fpr_at_tpr",
    "binary_roc_curve",
    "brier",
    "coverage_at_risk",
    "eaurc",
    "expected_calibration_error",
    "find_metric",
    "fit_temperature",
    "logit_scores",
    "maximum_calibration_error",
    "maximum_uncertainty_calibration_error",
    "metric_spec",
    "mutual_information",
    "nll",
    "ood_aupr",
    "ood_auroc",
    "ood_detection_metrics",
    "ood_fpr_at_tpr",
    "ood_metrics",
    "ood_roc_curve",
    "ood_scores",
    "predictive_entropy",
    "predictive_mean",
    "referral_auc",
    "referral_curve",
    "referral_rate_at_accuracy",
    "reliability_bins",
    "risk_at_coverage",
    "summarize",
    "temperature_nll",
    "uncertainty_calibration_bins",
    "uncertainty_calibration_error",
    "uncertainty_scores",
    "validate_logits",
    "validate_probs",
    "validate_targets",
]
