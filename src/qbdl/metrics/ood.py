"""OOD detection metrics: in-distribution = negatives, OOD = positives, larger score = more OOD.

OpenOOD v1.5 protocol (:func:`ood_metrics`): per score, AUROC, AUPR-in (ID positive, score negated),
AUPR-out (OOD positive) and FPR@95 (the fraction of ID points flagged as OOD at the threshold where
95% of the OOD points are flagged, OOD positive).  Scores from probabilities ``p [S, B, C]``:
``entropy`` H[pbar], ``mi``, ``maxprob`` (1 - max pbar); from logits ``[S, B, C]``: ``maxlogit``
(``-max_c`` of the MC-mean logit) and ``energy`` (``-logsumexp_c`` of the MC-mean logit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qbdl.metrics.registry import OOD_SCORE_METRICS
from qbdl.metrics.uncertainty import SCORE_NAMES, scores_from_probs
from qbdl.metrics.validation import validate_probs

__all__ = [
    "OOD_SCORES",
    "LOGIT_SCORES",
    "OOD_METRIC_KEYS",
    "validate_logits",
    "logit_scores",
    "ood_scores",
    "binary_auroc",
    "binary_average_precision",
    "binary_roc_curve",
    "binary_fpr_at_tpr",
    "ood_detection_metrics",
    "ood_metrics",
    "ood_auroc",
    "ood_aupr",
    "ood_roc_curve",
    "ood_fpr_at_tpr",
]

#: Scores computed from MC logits ``[S, B, C]`` (larger = more OOD).
LOGIT_SCORES = ("maxlogit", "energy")
#: Every OOD score name: probability scores first, then logit scores.
OOD_SCORES = (*SCORE_NAMES, *LOGIT_SCORES)
#: Keys of one score's block in :func:`ood_metrics` / :func:`ood_detection_metrics`.
OOD_METRIC_KEYS = tuple(OOD_SCORE_METRICS)


def validate_logits(logits: Tensor, name: str = "logits") -> Tensor:
    """Check that ``logits`` is a finite floating-point ``[S, B, C]`` tensor and return it."""
    if not isinstance(logits, Tensor):
        logits = torch.as_tensor(logits)
    if logits.ndim != 3:
        raise ValueError(f"{name} must have shape [S, B, C], got {logits.ndim}-D shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if min(logits.shape) == 0 or logits.shape[2] < 2:
        raise ValueError(f"{name} needs S >= 1, B >= 1 and C >= 2, got shape {tuple(logits.shape)}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return logits


def _logit_scores(l64: Tensor, score: str) -> Tensor:
    # MC reduction: average the logits over samples first, then take max / logsumexp over classes.
    mean = l64.mean(0)
    if score == "maxlogit":
        return -mean.max(-1).values
    if score == "energy":
        return -torch.logsumexp(mean, -1)
    raise ValueError(f"unknown logit score {score!r}; choose one of {LOGIT_SCORES}")


def logit_scores(logits: Tensor, score: str = "energy") -> Tensor:
    """Per-point OOD score from MC logits ``[S, B, C]`` in their dtype: ``maxlogit`` -max mean logit, ``energy`` -logsumexp mean logit."""
    logits = validate_logits(logits)
    return _logit_scores(logits.double(), score).to(logits.dtype)


def ood_scores(p_in: Tensor, p_out: Tensor, score: str = "entropy") -> tuple[Tensor, Tensor]:
    """Concatenated uncertainty scores and labels (0 = in-distribution, 1 = OOD) of two prediction sets."""
    p_in = validate_probs(p_in, "p_in")
    p_out = validate_probs(p_out, "p_out")
    if p_in.shape[-1] != p_out.shape[-1]:
        raise ValueError(f"p_in has C = {p_in.shape[-1]} classes but p_out has C = {p_out.shape[-1]}")
    s_in = scores_from_probs(p_in.double(), score)
    s_out = scores_from_probs(p_out.double(), score).to(s_in.device)
    labels = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)])
    return torch.cat([s_in, s_out]), labels


def _check_binary(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    scores = torch.as_tensor(scores).double().flatten()
    labels = torch.as_tensor(labels).flatten().to(scores.device)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.numel()}) and labels ({labels.numel()}) must have the same length")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf")
    pos = labels == 1
    if not bool(((labels == 0) | pos).all()):
        raise ValueError("labels must be 0 (in-distribution / negative) or 1 (OOD / positive)")
    n_pos = int(pos.sum())
    if n_pos == 0 or n_pos == labels.numel():
        raise ValueError("need at least one negative (in-distribution) and one positive (OOD) example")
    return scores, pos.double()


def _tie_groups(scores: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative (TP, FP) counts at each distinct threshold, thresholds in decreasing order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    s, lab = scores[order], pos[order]
    tp = torch.cumsum(lab, 0)
    fp = torch.cumsum(1.0 - lab, 0)
    # Keep only the last index of each run of equal scores: a threshold includes all tied points.
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    return tp[last], fp[last]


def binary_auroc(scores: Tensor, labels: Tensor) -> float:
    """Rank-based (Mann-Whitney) AUROC with mid-ranks for ties; equals sklearn's ``roc_auc_score``."""
    scores, pos = _check_binary(scores, labels)
    sorted_s, order = torch.sort(scores, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1.0) / 2.0  # average 1-based rank of each tie group
    ranks = torch.empty_like(scores)
    ranks[order] = mid[inverse]
    n_pos = pos.sum()
    n_neg = pos.numel() - n_pos
    return float(((ranks * pos).sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_average_precision(scores: Tensor, labels: Tensor) -> float:
    """Average precision ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds (sklearn's definition)."""
    scores, pos = _check_binary(scores, labels)
    tp, fp = _tie_groups(scores, pos)
    precision = tp / (tp + fp)
    recall = tp / pos.sum()
    d_recall = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((d_recall * precision).sum())


def binary_roc_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """ROC curve (fpr, tpr) over all distinct thresholds, starting at (0, 0) and ending at (1, 1)."""
    scores, pos = _check_binary(scores, labels)
    tp, fp = _tie_groups(scores, pos)
    zero = tp.new_zeros(1)
    fpr = torch.cat([zero, fp / (pos.numel() - pos.sum())])
    tpr = torch.cat([zero, tp / pos.sum()])
    return fpr.cpu(), tpr.cpu()


def _fpr_at_tpr(fpr: Tensor, tpr: Tensor, level: float) -> float:
    return float(fpr[tpr >= level - 1e-12].min())


def binary_fpr_at_tpr(scores: Tensor, labels: Tensor, tpr: float = 0.95) -> float:
    """FPR at the first (highest) threshold, over whole tie groups, whose TPR is ``>= tpr`` (positives = 1)."""
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    return _fpr_at_tpr(*binary_roc_curve(scores, labels), float(tpr))


def ood_detection_metrics(scores_in: Tensor, scores_out: Tensor) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR@95 from per-point scores (larger = more OOD) of ID and OOD points.

    ``auroc``: rank AUROC with mid-ranks for ties (sklearn ``roc_auc_score``), OOD positive.
    ``aupr_in`` / ``aupr_out``: average precision (sklearn ``average_precision_score``, a step-wise
    sum over distinct thresholds) with ID positive on the negated score / OOD positive on the score;
    OpenOOD integrates the PR curve with the trapezoid rule instead, which differs slightly.
    ``fpr95``: fraction of ID points scoring at or above the highest threshold that flags >= 95% of the
    OOD points (thresholds keep tie groups whole), as torch-uncertainty's ``FPR95(pos_label=1)`` and
    OpenOOD's ``fpr[argmax(tpr >= 0.95)]`` on sklearn's ``roc_curve``.
    """
    s_in = torch.as_tensor(scores_in).double().flatten()
    s_out = torch.as_tensor(scores_out).double().flatten().to(s_in.device)
    s = torch.cat([s_in, s_out])
    lab = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)])
    fpr, tpr = binary_roc_curve(s, lab)
    return {
        "auroc": binary_auroc(s, lab),
        "aupr_in": binary_average_precision(-s, 1.0 - lab),
        "aupr_out": binary_average_precision(s, lab),
        "fpr95": _fpr_at_tpr(fpr, tpr, 0.95),
    }


def _per_point_scores(p: Tensor, logits: Tensor | None, score: str, which: str) -> Tensor:
    if score in SCORE_NAMES:
        return scores_from_probs(p.double(), score)
    if score not in LOGIT_SCORES:
        raise ValueError(f"unknown OOD score {score!r}; choose one of {OOD_SCORES}")
    if logits is None:
        raise ValueError(f"score {score!r} needs logits_{which}")
    return _logit_scores(logits.double(), score).to(p.device)


def _checked_logits(logits: Tensor | None, p: Tensor, name: str) -> Tensor | None:
    if logits is None:
        return None
    logits = validate_logits(logits, name)
    if logits.shape[1:] != p.shape[1:]:
        raise ValueError(
            f"{name} has [B, C] = {list(logits.shape[1:])} but the probabilities have {list(p.shape[1:])}"
        )
    return logits


def ood_metrics(
    p_in: Tensor,
    p_out: Tensor,
    logits_in: Tensor | None = None,
    logits_out: Tensor | None = None,
    scores: tuple[str, ...] | None = None,
) -> dict[str, dict[str, float]]:
    """OpenOOD-v1.5-style ``{score: {auroc, aupr_in, aupr_out, fpr95}}`` for ID ``p_in`` vs OOD ``p_out`` ``[S, B, C]``.

    ``scores`` defaults to ``entropy, mi, maxprob`` plus ``maxlogit, energy`` when both logit tensors
    are given (logits ``[S, B, C]`` aligned with the probabilities).  See :func:`ood_detection_metrics`.
    """
    p_in = validate_probs(p_in, "p_in")
    p_out = validate_probs(p_out, "p_out")
    if p_in.shape[-1] != p_out.shape[-1]:
        raise ValueError(f"p_in has C = {p_in.shape[-1]} classes but p_out has C = {p_out.shape[-1]}")
    logits_in = _checked_logits(logits_in, p_in, "logits_in")
    logits_out = _checked_logits(logits_out, p_out, "logits_out")
    if scores is None:
        have_logits = logits_in is not None and logits_out is not None
        scores = OOD_SCORES if have_logits else SCORE_NAMES
    out: dict[str, dict[str, float]] = {}
    for score in scores:
        s_in = _per_point_scores(p_in, logits_in, score, "in")
        s_out = _per_point_scores(p_out, logits_out, score, "out")
        out[score] = ood_detection_metrics(s_in, s_out.to(s_in.device))
    return out


def ood_auroc(p_in: Tensor, p_out: Tensor, score: str = "entropy") -> float:
    """AUROC for separating OOD (positive) from in-distribution (negative) points by the uncertainty score."""
    return binary_auroc(*ood_scores(p_in, p_out, score))


def ood_aupr(p_in: Tensor, p_out: Tensor, score: str = "entropy") -> float:
    """Area under the precision-recall curve with OOD as the positive class (average precision)."""
    return binary_average_precision(*ood_scores(p_in, p_out, score))


def ood_roc_curve(p_in: Tensor, p_out: Tensor, score: str = "entropy") -> tuple[Tensor, Tensor]:
    """ROC curve ``(fpr, tpr)`` for OOD detection, for plotting."""
    return binary_roc_curve(*ood_scores(p_in, p_out, score))


def ood_fpr_at_tpr(p_in: Tensor, p_out: Tensor, tpr: float = 0.95, score: str = "entropy") -> float:
    """Smallest false-positive rate over thresholds whose true-positive rate is ``>= tpr`` (FPR95 by default)."""
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    fpr_c, tpr_c = ood_roc_curve(p_in, p_out, score)
    return _fpr_at_tpr(fpr_c, tpr_c, float(tpr))
