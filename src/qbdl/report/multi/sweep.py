"""The sweep summary: one row per (job, variant) with the overrides that vary between jobs."""

from __future__ import annotations

from collections.abc import Sequence

from qbdl.report.multi.render import md_table
from qbdl.report.multi.runs import Run, run_overrides
from qbdl.report.table import column_title, format_cell

SWEEP_METRICS = ("accuracy", "nll", "uce", "referral_rate_at_target", "ood_auroc")


def sweep_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """One row per (job, variant): the overrides that vary between jobs and the headline metrics."""
    ovs = [run_overrides(r) for r in runs]
    keys = sorted({k for o in ovs for k in o if len({o2.get(k) for o2 in ovs}) > 1})
    header = ["job", *keys, "variant", *(column_title(m) for m in SWEEP_METRICS)]
    rows = []
    for r, ov in zip(runs, ovs):
        for v, res in r.variants.items():
            vals = [format_cell(m, res.get(m)) for m in SWEEP_METRICS]
            rows.append([r.path.name, *(ov.get(k, "-") for k in keys), v, *vals])
    return header, rows


def sweep_markdown(runs: Sequence[Run], best: dict | None = None) -> str:
    """The sweep summary table as Markdown (plus the optimizer's best point when given)."""
    text = "# Sweep summary\n\n" + md_table(*sweep_rows(runs)) + "\n"
    if best:
        text += "\n## Best\n\n" + "\n".join(f"- {k}: {v}" for k, v in best.items()) + "\n"
    return text
