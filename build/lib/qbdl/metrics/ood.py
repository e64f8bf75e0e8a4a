"""OOD detection metrics: in-distribution = negatives, OOD = positives, larger uncertainty = more OOD."""

from __future__ import annotations

import torch
from torch import Tensor

from qbdl.metrics.functional import _scores, validate_probs


def ood_scores(p_in: Tensor, p_out: Tensor, score: str = "entropy") -> tuple[Tensor, Tensor]:
    """Concatenated uncertainty scores and labels (0 = in-distribution, 1 = OOD) of two prediction sets."""
    p_in = validate_probs(p_in, "p_in")
    p_out = validate_probs(p_out, "p_out")
    if p_in.shape[-1] != p_out.shape[-1]:
        raise ValueError(f"p_in has C = {p_in.shape[-1]} classes but p_out has C = {p_out.shape[-1]}")
    s_in = _scores(p_in.double(), score)
    s_out = _scores(p_out.double(), score).to(s_in.device)
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
