"""A W&B Report of a set of runs, built with wandb-workspaces (`wandb_workspaces.reports.v2`).

Building the Report object needs no network; saving it does (W&B online and logged in). Offline, or when
wandb-workspaces is not installed, the same structure is written as plain dict blocks to wandb_report.json.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qbdl.report import multi

HEADLINE = ("accuracy", "nll", "uce", "referral_rate_at_target", "ood_auroc")


def report_blocks(runs: Sequence[multi.Run], entity: str, project: str) -> list[dict[str, Any]]:
    """The report as plain dict blocks: headings, Markdown tables, and a panel grid over the project's runs."""
    blocks: list[dict[str, Any]] = [
        {"type": "h1", "text": "qbdl: quantized Bayesian deep learning"},
        {"type": "p", "text": multi.render_markdown(runs).split("\n\n", 2)[1]},
    ]
    variants = sorted({v for r in runs for v in r.variants})
    media = sorted({f"plots/{name}" for r in runs for name in (r.results.get("plots") or {})})
    for gi, g in enumerate(multi.group_runs(runs)):
        blocks.append({"type": "h2", "text": f"Group {gi}: {g.label} (seeds {g.seeds})"})
        blocks.append({"type": "markdown", "text": multi.md_table(*multi.stats_rows(g))})
        cl = multi.claims(g)
        if cl:
            blocks.append({"type": "markdown", "text": multi.md_table(*multi.claim_rows(cl))})
    blocks.append(
        {
            "type": "panel_grid",
            "entity": entity,
            "project": project,
            "panels": [
                {"type": "bar", "title": m, "metrics": [f"{v}/{m}" for v in variants]} for m in HEADLINE
            ]
            + [{"type": "media", "keys": media}, {"type": "table", "key": "comparison"}],
        }
    )
    return blocks


def build_report(runs: Sequence[multi.Run], entity: str, project: str, title: str = "qbdl report") -> Any:
    """A wandb_workspaces Report object (not saved); raises ImportError without wandb-workspaces."""
    import wandb_workspaces.reports.v2 as wr

    body: list[Any] = []
    for b in report_blocks(runs, entity, project):
        if b["type"] == "h1":
            body.append(wr.H1(b["text"]))
        elif b["type"] == "h2":
            body.append(wr.H2(b["text"]))
        elif b["type"] == "p":
            body.append(wr.P(b["text"]))
        elif b["type"] == "markdown":
            body.append(wr.MarkdownBlock(b["text"]))
        elif b["type"] == "panel_grid":
            panels: list[Any] = [
                wr.BarPlot(title=p["title"], metrics=p["metrics"]) for p in b["panels"] if p["type"] == "bar"
            ]
            media = next(p["keys"] for p in b["panels"] if p["type"] == "media")
            panels.append(wr.MediaBrowser(title="plots", media_keys=media))
            panels.append(wr.WeavePanelSummaryTable(table_name="comparison"))
            body.append(
                wr.PanelGrid(
                    runsets=[wr.Runset(entity=entity, project=project, name="qbdl runs")], panels=panels
                )
            )
    return wr.Report(
        entity=entity, project=project, title=title, description="qbdl multi-run report", blocks=body
    )


def publish(runs: Sequence[multi.Run], entity: str, project: str, out_dir: str | Path) -> str:
    """Save the W&B Report when online; otherwise write OUT/wandb_report.json. Returns a URL or the file path."""
    from qbdl.io import atomic_write_json

    out = Path(out_dir) / "wandb_report.json"
    online = os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled", "dryrun")
    try:
        report = build_report(runs, entity, project)
    except ImportError:
        report = None
    if report is not None and online:
        try:
            report.save()
            return str(report.url)
        except Exception as exc:  # not logged in, no network: keep the structure on disk instead
            print(f"warning: could not save the W&B report ({type(exc).__name__}: {exc}); writing {out}")
    atomic_write_json(
        out,
        {
            "entity": entity,
            "project": project,
            "wandb_workspaces": report is not None,
            "blocks": report_blocks(runs, entity, project),
        },
    )
    return str(out)
