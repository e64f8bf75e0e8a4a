"""One-call metric summary used by the experiment pipeline."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from qbdl.metrics.calibration import (
    adaptive_bin_sums,
    confidence_bin_sums,
    ece_from_sums,
    max_gap_from_sums,
    uncertainty_bin_sums,
)
from qbdl.metrics.ood import OOD_METRIC_KEYS, ood_metrics
from qbdl.metrics.registry import OOD_SET_METRICS, summary_keys
from qbdl.metrics.scoring import brier_terms, correct_terms, nll_terms
from qbdl.metrics.selective import (
    curve_augrc,
    curve_aurc,
    curve_coverage_at_risk,
    curve_eaurc,
    curve_from_scores,
    curve_rate_at_accuracy,
    curve_referral_auc,
    curve_risk_at_coverage,
)
from qbdl.metrics.uncertainty import SCORE_NAMES, entropy_of_mean, mean_entropy, mi_terms, scores_from_probs
from qbdl.metrics.validation import check_bins, check_fraction, validate_probs, validate_targets

__all__ = ["summarize", "SUMMARY_KEYS", "OOD_KEYS", "OOD_METRIC_KEYS"]

#: Keys of the result, in order: the registry's summary entries (qbdl.metrics.registry.METRICS).
SUMMARY_KEYS = summary_keys()
#: Keys of ``result["ood"][name]``: flat metrics of the selected score, MI metrics, and the details.
OOD_KEYS = (*OOD_SET_METRICS, "score", "group", "scores")


def _ordered(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``values`` in the order of ``keys``; a value computed without a registry entry (or vice versa) is an error."""
    if set(values) != set(keys):
        raise RuntimeError(
            f"summarize and qbdl.metrics.registry disagree on {sorted(set(values) ^ set(keys))}"
        )
    return {k: values[k] for k in keys}


def _ood_block(
    p_in: Tensor,
    p_out: Tensor,
    score: str,
    logits_in: Tensor | None,
    logits_out: Tensor | None,
    group: str | None,
) -> dict[str, Any]:
    scores = ood_metrics(p_in, p_out, logits_in, logits_out)
    sel, mi = scores[score], scores["mi"]
    block: dict[str, Any] = {
        "auroc": sel["auroc"],
        "aupr": sel["aupr_out"],
        "fpr95": sel["fpr95"],
        "auroc_mi": mi["auroc"],
        "aupr_mi": mi["aupr_out"],
        "fpr95_mi": mi["fpr95"],
        "score": score,
        "group": group,
        "scores": scores,
    }
    return _ordered(block, OOD_KEYS)


def _group_means(blocks: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {score: {metric: mean over the group's OOD sets that have that score}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group in dict.fromkeys(b["group"] for b in blocks.values() if b["group"] is not None):
        members = [b["scores"] for b in blocks.values() if b["group"] == group]
        names = list(dict.fromkeys(name for m in members for name in m))
        out[group] = {
            name: {
                key: sum(m[name][key] for m in members if name in m) / sum(name in m for m in members)
                for key in OOD_METRIC_KEYS
            }
            for name in names
        }
    return out


def summarize(
    p: Tensor,
    y: Tensor,
    ood: dict[str, Tensor] | None = None,
    target_accuracy: float = 0.995,
    n_bins: int = 15,
    score: str = "entropy",
    logits: Tensor | None = None,
    ood_logits: dict[str, Tensor] | None = None,
    ood_groups: dict[str, str] | None = None,
    coverages: tuple[float, ...] = (0.8, 0.9, 0.95),
    risks: tuple[float, ...] = (0.01, 0.02, 0.05),
) -> dict[str, Any]:
    """All scalar metrics of ``p [S, B, C]`` vs ``y [B]`` as a JSON-serialisable dict (keys: ``SUMMARY_KEYS``).

    Calibration errors are fractions in [0, 1] (not percent); ``ece_adaptive`` uses equal-mass bins.
    ``score`` (``entropy``, ``mi`` or ``maxprob``) ranks the points for the referral / selective
    metrics (``referral_*, aurc, eaurc, augrc``, ``risk_at_coverage {str(c): risk}``,
    ``coverage_at_risk {str(r): coverage}``) and for the flat OOD keys.

    ``ood`` maps a name to OOD predictions ``[S, B', C]``, with ``p`` as the in-distribution
    negatives; ``result["ood"][name]`` holds ``auroc, aupr (= AUPR-out), fpr95`` of the selected
    ``score``, ``auroc_mi, aupr_mi, fpr95_mi`` of the MI score, ``score`` (its name), ``group``
    (``ood_groups.get(name)``, e.g. "near" / "far", or None) and ``scores``
    ``{score: {auroc, aupr_in, aupr_out, fpr95}}`` (see :func:`qbdl.metrics.ood.ood_metrics`) for
    ``entropy, mi, maxprob``, plus ``maxlogit, energy`` when ``logits`` ``[S, B, C]`` and
    ``ood_logits[name]`` are both given.  ``ood_auroc`` is the flat AUROC of the first OOD set (None
    without OOD data); ``ood_groups`` is ``{group: {score: {metric: mean over the group's sets}}}``.
    """
    p = validate_probs(p)
    y = validate_targets(y, p.shape[1], p.shape[2]).to(p.device)
    if not 0.0 <= float(target_accuracy) <= 1.0:
        raise ValueError(f"target_accuracy must lie in [0, 1], got {target_accuracy}")
    check_bins(n_bins)
    if score not in SCORE_NAMES:
        raise ValueError(f"unknown uncertainty score {score!r}; choose one of {SCORE_NAMES}")
    coverages = tuple(check_fraction(c, "coverage", low_open=True) for c in coverages)
    risks = tuple(check_fraction(r, "risk") for r in risks)
    p64 = p.double()
    correct = correct_terms(p64, y)
    curve = curve_from_scores(scores_from_probs(p64, score), correct)
    conf_sums = confidence_bin_sums(p, y, n_bins)
    unc_sums = uncertainty_bin_sums(p, y, n_bins)
    result: dict[str, Any] = {
        "accuracy": float(correct.mean()),
        "nll": float(nll_terms(p64, y).mean()),
        "brier": float(brier_terms(p64, y).mean()),
        "ece": ece_from_sums(*conf_sums),
        "ece_adaptive": ece_from_sums(*adaptive_bin_sums(p, y, n_bins)),
        "mce": max_gap_from_sums(*conf_sums),
        "uce": ece_from_sums(*unc_sums),
        "muce": max_gap_from_sums(*unc_sums),
        "entropy_mean": float(entropy_of_mean(p64).mean()),
        "aleatoric_mean": float(mean_entropy(p64).mean()),
        "mi_mean": float(mi_terms(p64).mean()),
        "referral_rate_at_target": curve_rate_at_accuracy(curve, float(target_accuracy)),
        "referral_auc": curve_referral_auc(curve),
        "aurc": curve_aurc(curve),
        "eaurc": curve_eaurc(curve),
        "augrc": curve_augrc(curve),
        "risk_at_coverage": {str(c): curve_risk_at_coverage(curve, c) for c in coverages},
        "coverage_at_risk": {str(r): curve_coverage_at_risk(curve, r) for r in risks},
        "ood": {},
        "ood_auroc": None,
        "ood_groups": {},
    }
    ood_logits = ood_logits or {}
    ood_groups = ood_groups or {}
    for i, (name, p_out) in enumerate((ood or {}).items()):
        out_logits = ood_logits.get(name)
        block = _ood_block(
            p,
            p_out,
            score,
            logits if out_logits is not None else None,
            out_logits if logits is not None else None,
            ood_groups.get(name),
        )
        result["ood"][str(name)] = block
        if i == 0:
            result["ood_auroc"] = block["auroc"]
    result["ood_groups"] = _group_means(result["ood"])
    return _ordered(result, SUMMARY_KEYS)
