"""Self-contained HTML report of one run: the comparison table, OOD figures and the plots."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from qbdl.io import atomic_write_bytes
from qbdl.metrics.registry import OOD_SCORE_METRICS, OOD_SCORES
from qbdl.report.shift import shift_table
from qbdl.report.table import table_rows

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:380px;margin:4px;border:1px solid #eee}
.figs{display:flex;flex-wrap:wrap}.fig{text-align:center;font-size:small}
"""


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table from a header and rows of strings."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _ood_table(variants: dict) -> str:
    sets = sorted({s for r in variants.values() for s in (r.get("ood") or {})})
    if not sets:
        return ""
    cols = OOD_SCORE_METRICS  # the registry's per-score metrics, labels and formats
    header = ["variant", "score"] + [f"{s} {spec.label}" for s in sets for spec in cols.values()]
    rows = []
    for name, r in variants.items():
        for score in OOD_SCORES:
            row = [name, score]
            for s in sets:
                d = ((r.get("ood") or {}).get(s, {}).get("scores") or {}).get(score, {})
                row += ["-" if d.get(k) is None else spec.format(d[k]) for k, spec in cols.items()]
            rows.append(row)
    groups = {s: (variants[next(iter(variants))].get("ood") or {}).get(s, {}).get("group") for s in sets}
    note = ", ".join(f"{s}: {g or 'untagged'}" for s, g in groups.items())
    return (
        "<h2>Out-of-distribution detection</h2>"
        f"<p>OpenOOD-style: OOD positive; AUPR-in treats in-distribution as positive. Groups: {html.escape(note)}.</p>"
        + html_table(header, rows)
    )


def _shift_section(shift: dict) -> str:
    if not shift:
        return ""
    return f"<h2>Data shift (mean over corruptions per severity)</h2><pre>{html.escape(shift_table(shift))}</pre>"


def write_run_report(results: dict, run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html (plots linked by relative path)."""
    run_dir = Path(run_dir)
    target = (results.get("config") or {}).get("eval", {}).get("target_accuracy")
    header, rows = table_rows(results["variants"], target)
    figs = "".join(
        f'<div class="fig"><img src="{html.escape(os.path.relpath(p, run_dir))}"><br>{html.escape(name)}</div>'
        for name, p in sorted(results.get("plots", {}).items())
    )
    cfg = json.dumps(results.get("config", {}), indent=1)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>qbdl run report</title>
<style>{STYLE}</style></head><body>
<h1>qbdl run: {html.escape(str(run_dir.name))}</h1>
<p>ECE, UCE and referral rate in %; referral = fraction of test images referred to reach the target accuracy
(100% when never reached); OOD AUROC of the first OOD set, near/far = means over the sets of each group,
score = {html.escape(str(((results.get("config") or {}).get("eval") or {}).get("score", "entropy")))}.</p>
{html_table(header, rows)}
{_ood_table(results["variants"])}
{_shift_section(results.get("shift") or {})}
<h2>Figures</h2><div class="figs">{figs}</div>
<h2>Configuration</h2><pre>{html.escape(cfg)}</pre>
<h2>Versions and timings</h2><pre>{html.escape(json.dumps({"versions": results.get("versions"), "timings": results.get("timings")}, indent=1))}</pre>
</body></html>"""
    return atomic_write_bytes(run_dir / "report.html", doc.encode())
