"""Headless matplotlib figures for the metric outputs of :mod:`qbdl.metrics`.

Figures are built with :class:`matplotlib.figure.Figure` and an Agg canvas, never through the pyplot
state machine, so they work without a display and never leak into ``plt.show()``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "reliability_diagram",
    "uncertainty_calibration_diagram",
    "referral_curves",
    "entropy_density",
    "entropy_densities",
    "ood_roc_curves",
    "metric_vs_throughput",
    "save_figure",
]

#: The uncertainty metrics drawn against images/s (results keys; units and directions from the registry).
THROUGHPUT_METRICS = ("accuracy", "nll", "ece", "uce", "augrc", "ood_auroc")


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def _get(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)


def _new_figure(figsize: tuple[float, float] = (4.5, 4.0)) -> tuple[Figure, Axes]:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _binned_bars(ax: Axes, edges: np.ndarray, heights: np.ndarray, count: np.ndarray, label: str) -> None:
    widths = np.diff(edges)
    shown = np.where(count > 0, heights, 0.0)
    ax.bar(edges[:-1], shown, width=widths, align="edge", edgecolor="black", alpha=0.8, label=label)


def reliability_diagram(bins: Any, title: str | None = None) -> Figure:
    """Accuracy vs confidence per bin (bars) against the identity, from :func:`qbdl.metrics.reliability_bins`."""
    edges, count = _np(_get(bins, "edges")), _np(_get(bins, "count"))
    conf, acc = _np(_get(bins, "confidence")), _np(_get(bins, "accuracy"))
    fig, ax = _new_figure()
    _binned_bars(ax, edges, acc, count, "accuracy")
    nonempty = count > 0
    ax.plot(conf[nonempty], acc[nonempty], "o", color="tab:red", ms=3, label="bin mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title or "Reliability")
    ax.legend(loc="upper left", fontsize="small")
    return fig


def uncertainty_calibration_diagram(bins: Any, title: str | None = None) -> Figure:
    """Error vs normalised uncertainty per bin against the identity, from ``uncertainty_calibration_bins``."""
    edges, count = _np(_get(bins, "edges")), _np(_get(bins, "count"))
    unc, err = _np(_get(bins, "uncertainty")), _np(_get(bins, "error"))
    fig, ax = _new_figure()
    _binned_bars(ax, edges, err, count, "error")
    nonempty = count > 0
    ax.plot(unc[nonempty], err[nonempty], "o", color="tab:red", ms=3, label="bin mean uncertainty")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="uncertainty  H[p̄] / log C",
        ylabel="error",
        title=title or "Uncertainty calibration",
    )
    ax.legend(loc="upper left", fontsize="small")
    return fig


def referral_curves(
    curves: Mapping[str, Any], target: float | None = None, title: str | None = None
) -> Figure:
    """Retained accuracy vs referred fraction for each variant; oracle and random references dashed/dotted."""
    if not curves:
        raise ValueError("referral_curves needs at least one {variant: curve} entry")
    fig, ax = _new_figure((5.5, 4.0))
    for i, (name, curve) in enumerate(curves.items()):
        color = f"C{i % 10}"
        frac = _np(_get(curve, "fraction_referred"))
        ax.plot(frac, _np(_get(curve, "accuracy")), color=color, lw=1.5, label=str(name))
        ax.plot(frac, _np(_get(curve, "oracle_accuracy")), color=color, lw=1, ls="--", alpha=0.7)
        ax.plot(frac, _np(_get(curve, "random_accuracy")), color=color, lw=1, ls=":", alpha=0.7)
    # Style-only legend entries so the reader can decode the reference line styles.
    ax.plot([], [], color="gray", ls="--", label="oracle")
    ax.plot([], [], color="gray", ls=":", label="random")
    if target is not None:
        ax.axhline(target, color="black", lw=0.8, ls="-.", label=f"target {target:g}")
    ax.set(xlim=(0, 1), xlabel="fraction referred", ylabel="accuracy on retained", title=title or "Referral")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def generalized_risk_curves(curves: Mapping[str, Any], title: str | None = None) -> Figure:
    """Generalized risk (errors among accepted / all points) vs coverage per variant: AUGRC is its area."""
    if not curves:
        raise ValueError("generalized_risk_curves needs at least one {variant: curve} entry")
    fig, ax = _new_figure((5.5, 4.0))
    for i, (name, curve) in enumerate(curves.items()):
        coverage = 1.0 - _np(_get(curve, "fraction_referred"))
        risk = coverage * (1.0 - _np(_get(curve, "accuracy")))
        ax.plot(np.r_[coverage, 0.0], np.r_[risk, 0.0], color=f"C{i % 10}", lw=1.5, label=str(name))
    ax.set(
        xlim=(0, 1), xlabel="coverage", ylabel="generalized risk", title=title or "Generalized risk (AUGRC)"
    )
    ax.legend(loc="upper left", fontsize="small")
    return fig


def _density_axes(
    ax: Axes, entropy_correct: Any, entropy_incorrect: Any, bins: int, title: str | None
) -> None:
    ec, ei = _np(entropy_correct).ravel(), _np(entropy_incorrect).ravel()
    both = np.concatenate([ec, ei])
    hi = float(both.max()) if both.size and both.max() > 0 else 1.0
    edges = np.linspace(0.0, hi, bins + 1)
    if ec.size:
        ax.hist(ec, bins=edges, density=True, alpha=0.6, color="tab:blue", label=f"correct (n={ec.size})")
    if ei.size:
        ax.hist(ei, bins=edges, density=True, alpha=0.6, color="tab:red", label=f"incorrect (n={ei.size})")
    ax.set(xlabel="predictive entropy [nats]", ylabel="density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")


def entropy_density(
    entropy_correct: Any, entropy_incorrect: Any, bins: int = 30, title: str | None = None
) -> Figure:
    """Density histograms of predictive entropy for correctly vs incorrectly classified points."""
    fig, ax = _new_figure((5.0, 3.5))
    _density_axes(ax, entropy_correct, entropy_incorrect, bins, title or "Predictive entropy")
    return fig


def entropy_densities(variants: Mapping[str, Sequence[Any]], bins: int = 30) -> Figure:
    """One entropy-density panel per variant: ``{variant: (entropy_correct, entropy_incorrect)}``."""
    if not variants:
        raise ValueError("entropy_densities needs at least one {variant: (correct, incorrect)} entry")
    n = len(variants)
    fig = Figure(figsize=(4.0 * n, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (name, (ec, ei)) in zip(axes, variants.items()):
        _density_axes(ax, ec, ei, bins, str(name))
    return fig


def ood_roc_curves(curves: Mapping[str, Sequence[Any]], title: str | None = None) -> Figure:
    """OOD-detection ROC curves ``{variant: (fpr, tpr)}`` with the chance diagonal."""
    if not curves:
        raise ValueError("ood_roc_curves needs at least one {variant: (fpr, tpr)} entry")
    fig, ax = _new_figure()
    for name, (fpr, tpr) in curves.items():
        ax.plot(_np(fpr), _np(tpr), lw=1.5, label=str(name))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_title(title or "OOD detection ROC")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def metric_vs_throughput(
    variants: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = THROUGHPUT_METRICS, x_key: str = "images_per_s"
) -> Figure:
    """One panel per metric: each variant one labelled point at (images/s, metric); INT8 variants filled squares.

    variants: results["variants"] (or seed means of it). The x axis is logarithmic; each panel's title says
    which direction is better.
    """
    from qbdl.metrics.registry import metric_spec

    names = [n for n, v in variants.items() if v.get(x_key) is not None]
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    for k, key in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        spec = metric_spec(key)
        for n in names:
            y = variants[n].get(key)
            if y is None:
                continue
            x = float(variants[n][x_key])
            quant = n.startswith("q")
            ax.scatter([x], [spec.display(float(y))], marker="s" if quant else "o", s=28,
                       color="C3" if quant else "C0")  # fmt: skip
            ax.annotate(n, (x, spec.display(float(y))), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("images / s (log)")
        ax.set_ylabel(spec.label)
        ax.set_title(f"{spec.label} ({spec.better or 'no'} is better)" if spec.better else spec.label, fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write ``fig`` as PNG atomically (temp file + ``os.replace``), creating parent dirs; closes the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        # Only pyplot-managed figures are registered globally; plain Figure objects just get GC'd.
        if getattr(fig.canvas, "manager", None) is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return path
