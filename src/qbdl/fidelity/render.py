"""The error budget as a table, a figure and JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qbdl.fidelity.parts import PART_DOC

_SCALE = {"accuracy": 100, "uce": 100, "ece": 100, "brier": 1, "nll": 1}


def _scale(m: str) -> float:
    return _SCALE.get(m, 100 if m.startswith("ood_auroc") else 1)


def _deltas(d: dict) -> str:
    """'metric +x.xxx, ...' in the table's units, the per-set OOD AUROCs left out (their mean stays)."""
    return ", ".join(f"{m} {v * _scale(m):+.3f}" for m, v in d.items() if not m.startswith("ood_auroc/"))


def format_budget(budget: dict) -> str:
    """A plain-text table: per metric the gap, its MC floor, each part alone, Shapley shares, kernel residual."""
    cols = ["BNN", "QBNN", "gap", "floor", "a", "b", "c", "all(emu)", "sh.a", "sh.b", "sh.c", "kernel"]
    rows = []
    for m, g in budget["gap"].items():
        k = _scale(m)
        vals = [g["bnn"], g["qbnn"], g["gap"], g["mc_floor"], *g["alone"].values(), g["emulated"],
                *g["shapley"].values(), g["kernel_residual"]]  # fmt: skip
        rows.append([m + (" (pt)" if k == 100 else "")] + [f"{v * k:+.3f}" if i >= 2 else f"{v * k:.3f}"
                                                           for i, v in enumerate(vals)])  # fmt: skip
    w0 = max(len(r[0]) for r in rows + [["metric"]])
    lines = ["metric".ljust(w0) + "".join(c.rjust(9) for c in cols)]
    lines += [r[0].ljust(w0) + "".join(c.rjust(9) for c in r[1:]) for r in rows]
    ch = budget["checks"]
    lines.append(
        f"parts: a = {PART_DOC['a']}; b = {PART_DOC['b']}; c = {PART_DOC['c']}. alone: that part only; sh.: Shapley "
        "share (sh.a+sh.b+sh.c = all(emu)); kernel = QBNN - all(emu); floor = MC noise of a BNN-vs-BNN gap."
    )
    on = ch["all_on_vs_qbnn"]
    lines.append(
        f"all off == BNN: {ch['all_off_vs_bnn']['equal']} (max |dlogit| {ch['all_off_vs_bnn']['max_abs_logit']:.2g}); "
        f"all on vs INT8 QBNN: max |dlogit| {on['max_abs_logit']:.3g} ({on['max_lsb']:.1f} logit LSB), "
        f"{100 * on['share_exact']:.1f}% of logits within 1/2 LSB, argmax agreement {100 * on['argmax_agreement']:.2f}%"
    )
    for name, block in budget.get("mixed", {}).items():
        lines.append(
            f"{name} ({', '.join(block['fp32_layers'])} at FP32, the rest INT8) vs all parts on: "
            f"{_deltas(block['vs_all_on'])} (gap to the BNN: {_deltas(block['gap'])})"
        )
    if "sigma_grid" in budget:
        lines.append(
            f"sigma's int8 grid, (a) alone minus (a) with the BNN's sigma: {_deltas(budget['sigma_grid']['vs_a'])}"
        )
    worst = sorted(budget["sites"].items(), key=lambda kv: -max(kv[1]["clip"].values(), default=0))[:3]
    if worst:
        lines.append(
            "most clipped activations: "
            + "; ".join(
                f"{n} " + ", ".join(f"{d} {100 * v:.3f}%" for d, v in s["clip"].items()) for n, s in worst
            )
        )
    return "\n".join(lines)


def plot_budget(budget: dict, path: str | Path) -> Path:
    """fidelity.png: per metric the Shapley parts, kernel residual and gap against the MC floor; per layer
    SQNR of mu, sigma and activations; per site the clipped share on each data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(budget["gap"])
    fig = plt.figure(figsize=(2.8 * max(len(metrics), 4), 8))
    grid = fig.add_gridspec(2, len(metrics))
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green", "kernel": "tab:gray", "gap": "black"}
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(grid[0, i])
        g, k = budget["gap"][m], _scale(m)
        names = ["a", "b", "c", "kernel", "gap"]
        vals = [g["shapley"]["a"], g["shapley"]["b"], g["shapley"]["c"], g["kernel_residual"], g["gap"]]
        ax.bar(names, [v * k for v in vals], color=[colors[n] for n in names])
        ax.axhspan(-g["mc_floor"] * k, g["mc_floor"] * k, color="tab:red", alpha=0.15, label="MC floor")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(m + (" (pt)" if k == 100 else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, : max(1, len(metrics) // 2)])
    names = list(budget["layers"])
    xs = range(len(names))
    for key, label in (("mu_sqnr_db", "mu"), ("sigma_sqnr_db", "sigma")):
        ax.plot(xs, [budget["layers"][n].get(key) or float("nan") for n in names], "o-", ms=3, label=label)
    act = [budget["sites"].get(n, {}).get("sqnr_db", {}).get("test") for n in names]
    ax.plot(xs, [a if a is not None else float("nan") for a in act], "s-", ms=3, label="activation (test)")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, max(1, len(metrics) // 2) :])
    snames = list(budget["sites"])
    datasets = list(dict.fromkeys(d for s in budget["sites"].values() for d in s["clip"]))
    width = 0.8 / max(len(datasets), 1)
    for j, d in enumerate(datasets):
        ax.bar([x + j * width for x in range(len(snames))],
               [100 * budget["sites"][s]["clip"].get(d, 0) for s in snames], width, label=d)  # fmt: skip
    ax.set_xticks(list(range(len(snames))), snames, rotation=90, fontsize=6)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("activations clipped (%, > scale/2 outside the grid)")
    ax.legend(fontsize=7)
    fig.suptitle(
        f"QBNN error budget ({budget['mc_samples']} MC samples, seed {budget['seed']}): a weights, b sampling, "
        "c activations (Shapley shares), kernel = QBNN - emulation"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def json_safe(o: Any) -> Any:
    """`o` with non-finite floats as JSON can hold them (NaN: null, inf: "inf"/"-inf") and string keys."""
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o
