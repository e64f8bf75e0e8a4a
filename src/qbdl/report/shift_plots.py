"""Data-shift figures (Ovadia et al. 2019 style): a metric vs severity, boxes over corruptions.

Headless like :mod:`qbdl.report.plots` (plain :class:`~matplotlib.figure.Figure` + Agg canvas); save
with :func:`qbdl.report.plots.save_figure`. Input: ``results[variant][corruption][severity] =
{metric: value}`` as in :mod:`qbdl.metrics.shift`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from qbdl.experiment.shape import shift_parts
from qbdl.metrics.registry import metric_spec
from qbdl.metrics.shift import Results, metric_values, paired_differences, severities
from qbdl.report.plots import save_figure

__all__ = ["severity_boxplot", "shift_difference_plot", "save_figure", "save_shift_plots"]


def _figure(n_positions: int) -> Figure:
    fig = Figure(figsize=(max(4.5, 1.1 * n_positions + 2.0), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def severity_boxplot(
    results: Results,
    metric: str,
    clean: Mapping[str, float] | None = None,
    variants: Sequence[str] | None = None,
    title: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """``metric`` vs severity: at each severity one box per variant over the corruptions.

    ``clean = {variant: value}`` adds a "clean" position (one flat box per variant) left of severity 1.
    The boxes are the figure's patches (``patch_artist``): variants x (severities + clean).
    """
    variants = list(variants) if variants is not None else list(results)
    if not variants:
        raise ValueError("severity_boxplot needs at least one variant")
    missing = [v for v in variants if v not in results]
    if missing:
        raise KeyError(f"variants {missing} not in results (have {sorted(results)})")
    sevs = severities({v: results[v] for v in variants})
    labels = (["clean"] if clean is not None else []) + [str(s) for s in sevs]
    fig = _figure(len(labels))
    ax = fig.add_subplot()
    n = len(variants)
    width = 0.8 / n
    for k, v in enumerate(variants):
        data: list[list[float]] = []
        if clean is not None:
            data.append([float(clean[v])] if v in clean else [])
        data += [list(metric_values(results, v, metric, s).values()) for s in sevs]
        pos = np.arange(len(labels)) + (k - (n - 1) / 2) * width
        keep = [i for i, d in enumerate(data) if d]
        if not keep:
            continue
        color = f"C{k % 10}"
        bp = ax.boxplot(
            [data[i] for i in keep],
            positions=pos[keep],
            widths=width * 0.9,
            patch_artist=True,
            manage_ticks=False,
            showfliers=True,
        )
        for box in bp["boxes"]:
            box.set(facecolor=color, alpha=0.6, edgecolor="black")
        for med in bp["medians"]:
            med.set(color="black")
        ax.plot([], [], "s", color=color, alpha=0.6, label=str(v))
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(xlabel="shift severity", ylabel=ylabel or metric, title=title or f"{metric} under data shift")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return fig


def shift_difference_plot(
    results: Results,
    metric: str,
    minuend: str = "qbnn",
    subtrahend: str = "bnn",
    clean: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Figure:
    """Per severity, a box of the paired per-corruption difference ``minuend - subtrahend`` (e.g. QBNN - BNN).

    ``clean = {variant: value}`` adds the clean difference as a flat box. A dashed line marks 0.
    """
    for v in (minuend, subtrahend):
        if v not in results:
            raise KeyError(f"variant {v!r} not in results (have {sorted(results)})")
    diffs = paired_differences(results, metric, minuend, subtrahend)
    labels: list[str] = []
    data: list[list[float]] = []
    if clean is not None and minuend in clean and subtrahend in clean:
        labels.append("clean")
        data.append([float(clean[minuend]) - float(clean[subtrahend])])
    for s, d in diffs.items():
        if d:
            labels.append(str(s))
            data.append(list(d.values()))
    fig = _figure(len(labels))
    ax = fig.add_subplot()
    if data:
        bp = ax.boxplot(
            data, positions=np.arange(len(data)), widths=0.6, patch_artist=True, manage_ticks=False
        )
        for box in bp["boxes"]:
            box.set(facecolor="C1", alpha=0.6, edgecolor="black")
        for med in bp["medians"]:
            med.set(color="black")
    ax.axhline(0.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(
        xlabel="shift severity",
        ylabel=f"{metric}: {minuend} - {subtrahend}",
        title=title or f"{minuend} - {subtrahend} under data shift",
    )
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_shift_plots(
    shift: Mapping[str, Any], out_dir: Path, clean: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, str]:
    """Ovadia-style box plots (accuracy, ECE, UCE vs severity; one box per variant; clean values when given)
    and, when both exist, the qbnn - bnn paired differences of the same metrics, as PNGs; ``{name: path}``.

    ``clean = {variant: clean metrics}`` (the evaluation's results) adds the "clean" position.
    """
    res = shift_parts(shift)["cells"]
    files: dict[str, str] = {}
    if not res:
        return files
    out_dir = Path(out_dir)
    for metric in ("accuracy", "ece", "uce"):
        title = metric_spec(metric).label.replace(" %", "")
        cv = None
        if clean is not None:
            cv = {v: float(clean[v][metric]) for v in res if v in clean and clean[v].get(metric) is not None}
        fig = severity_boxplot(res, metric, clean=cv, ylabel=title, title=f"{title} under data shift")
        name = f"shift_{metric}"
        files[name] = str(save_figure(fig, out_dir / f"{name}.png"))
        if "qbnn" in res and "bnn" in res:
            fig = shift_difference_plot(res, metric, "qbnn", "bnn", clean=cv)
            name = f"shift_diff_qbnn_bnn_{metric}"
            files[name] = str(save_figure(fig, out_dir / f"{name}.png"))
    return files
