"""One-call metric summary used by the experiment pipeline."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from qbdl.metrics.functional import (
    _aleatoric,
    _aurc,
    _brier_terms,
    _check_bins,
    _confidence_bin_sums,
    _correct,
    _eaurc,
    _ece_from_sums,
    _max_from_sums,
    _mi,
    _nll_terms,
    _pred_entropy,
    _rate_at_accuracy,
    _referral_auc,
    _referral_from_scores,
    _scores,
    _uncertainty_bin_sums,
    validate_probs,
    validate_targets,
)
from qbdl.metrics.ood import (
    _fpr_at_tpr,
    binary_auroc,
    binary_average_precision,
    binary_roc_curve,
    ood_scores,
)

__all__ = ["summarize", "SUMMARY_KEYS", "OOD_KEYS"]

SUMMARY_KEYS = (
    "accuracy",
    "nll",
    "brier",
    "ece",
    "mce",
    "uce",
    "muce",
    "entropy_mean",
    "aleatoric_mean",
    "mi_mean",
    "referral_rate_at_target",
    "referral_auc",
    "aurc",
    "eaurc",
    "ood",
    "ood_auroc",
)
OOD_KEYS = ("auroc", "aupr", "fpr95", "auroc_mi", "aupr_mi", "fpr95_mi")


def _ood_block(p_in: Tensor, p_out: Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for score, suffix in (("entropy", ""), ("mi", "_mi")):
        s, lab = ood_scores(p_in, p_out, score)
        fpr, tpr = binary_roc_curve(s, lab)
        out[f"auroc{suffix}"] = binary_auroc(s, lab)
        out[f"aupr{suffix}"] = binary_average_precision(s, lab)
        out[f"fpr95{suffix}"] = _fpr_at_tpr(fpr, tpr, 0.95)
    return {k: out[k] for k in OOD_KEYS}


def summarize(
    p: Tensor,
    y: Tensor,
    ood: dict[str, Tensor] | None = None,
    target_accuracy: float = 0.995,
    n_bins: int = 15,
    score: str = "entropy",
) -> dict[str, Any]:
    """All scalar metrics of ``p [S, B, C]`` vs ``y [B]`` as a JSON-serialisable dict.

    Keys: ``accuracy, nll, brier, ece, mce, uce, muce, entropy_mean, aleatoric_mean, mi_mean,
    referral_rate_at_target, referral_auc, aurc, eaurc, ood, ood_auroc``.  Calibration errors are
    fractions in [0, 1] (not percent).  ``score`` selects the ranking used for the referral metrics.
    ``ood`` maps a name to OOD predictions ``[S, B', C]``; ``result["ood"][name]`` holds
    ``auroc, aupr, fpr95`` (predictive-entropy score) and ``auroc_mi, aupr_mi, fpr95_mi`` (mutual
    information score), with ``p`` as the in-distribution negatives.  ``ood_auroc`` is the entropy
    AUROC of the first OOD set, or ``None`` without OOD data.
    """
    p = validate_probs(p)
    y = validate_targets(y, p.shape[1], p.shape[2]).to(p.device)
    if not 0.0 <= float(target_accuracy) <= 1.0:
        raise ValueError(f"target_accuracy must lie in [0, 1], got {target_accuracy}")
    _check_bins(n_bins)
    p64 = p.double()
    correct = _correct(p64, y)
    curve = _referral_from_scores(_scores(p64, score), correct)
    conf_sums = _confidence_bin_sums(p, y, n_bins)
    unc_sums = _uncertainty_bin_sums(p, y, n_bins)
    result: dict[str, Any] = {
        "accuracy": float(correct.mean()),
        "nll": float(_nll_terms(p64, y).mean()),
        "brier": float(_brier_terms(p64, y).mean()),
        "ece": _ece_from_sums(*conf_sums),
        "mce": _max_from_sums(*conf_sums),
        "uce": _ece_from_sums(*unc_sums),
        "muce": _max_from_sums(*unc_sums),
        "entropy_mean": float(_pred_entropy(p64).mean()),
        "aleatoric_mean": float(_aleatoric(p64).mean()),
        "mi_mean": float(_mi(p64).mean()),
        "referral_rate_at_target": _rate_at_accuracy(curve, float(target_accuracy)),
        "referral_auc": _referral_auc(curve),
        "aurc": _aurc(curve),
        "eaurc": _eaurc(curve),
        "ood": {},
        "ood_auroc": None,
    }
    for i, (name, p_out) in enumerate((ood or {}).items()):
        block = _ood_block(p, p_out)
        result["ood"][str(name)] = block
        if i == 0:
            result["ood_auroc"] = block["auroc"]
    return result
