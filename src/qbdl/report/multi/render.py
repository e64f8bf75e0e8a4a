"""The multi-run report: tables of mean ± std and claims per group, rendered as Markdown, HTML and summary.json."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from qbdl.metrics.registry import metric_spec
from qbdl.report.multi.claims import (
    SHIFT_METRICS,
    Claim,
    Stat,
    claims,
    fmt,
    metric_names,
    seed_stats,
    shift_claims,
)
from qbdl.report.multi.runs import Group, Run, group_runs, target_accuracy
from qbdl.report.table import table_rows


def title(metric: str) -> str:
    """The metric's display label (the registry's; an unregistered key is its own label)."""
    return metric_spec(metric).label


def format_stat(s: Stat, metric: str) -> str:
    """'mean ± std' in the metric's display unit."""
    if s.mean is None:
        return "-"
    if s.std is None:
        return fmt(s.mean, metric)
    return f"{fmt(s.mean, metric)} ± {fmt(s.std, metric)}"


def stats_rows(group: Group) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per variant, 'mean ± std' per metric."""
    st = seed_stats(group)
    names = metric_names(group)
    header = ["variant", "n", *(title(m) for m in names)]
    rows = [
        [v, str(max(s.n for s in ms.values())), *(format_stat(ms[m], m) for m in names)]
        for v, ms in st.items()
    ]
    return header, rows


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def claim_rows(cl: Sequence[Claim]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired-difference claims (p: t test or TOST; Holm-adjusted when applied)."""
    holm_on = any(c.p_adj is not None for c in cl)
    header = ["claim", "metric", "n", "mean diff ± sd", "95% CI", "margin", "p", *(["p (Holm)"] * holm_on)]
    header.append("verdict")
    rows = []
    for c in cl:
        op = "≡" if c.kind == "equivalence" else {"higher": ">", "lower": "<"}.get(c.better or "", "≠")
        what = f"{c.a} {op} {c.b}"
        ms = (
            "-"
            if c.mean is None
            else (f"{fmt(c.mean, c.metric)} ± {fmt(c.sd, c.metric)}" if c.sd else fmt(c.mean, c.metric))
        )
        ci = "-" if c.lo is None else f"[{fmt(c.lo, c.metric)}, {fmt(c.hi, c.metric)}]"
        margin = "-" if c.margin is None else f"±{fmt(c.margin, c.metric)}"
        row = [what, title(c.metric), str(c.n), ms, ci, margin, _p(c.p), *([_p(c.p_adj)] * holm_on)]
        rows.append([*row, c.verdict])
    return header, rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (cells with | escaped)."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    from qbdl.report.html import html_table

    return html_table(header, rows)


def _target(run: Run) -> float | None:
    return ((run.results.get("config") or {}).get("eval") or {}).get("target_accuracy")


def summary(runs: Sequence[Run], holm_correction: bool = False) -> dict:
    """Machine-readable summary: groups, per-variant mean/std, claims."""
    out = []
    for g in group_runs(runs):
        st = seed_stats(g)
        out.append(
            {
                "label": g.label,
                "runs": [str(r.path) for r in g.runs],
                "seeds": g.seeds,
                "stats": {v: {m: vars(s) for m, s in ms.items()} for v, ms in st.items()},
                "claims": [vars(c) | {"n": c.n} for c in claims(g, holm_correction)],
            }
        )
    return {"groups": out}


def _sections(runs: Sequence[Run], table, holm_correction: bool = False) -> list[tuple[int, str, str]]:
    """(heading level, heading, body) of the report, with `table(header, rows)` rendering tables."""
    groups = group_runs(runs)
    sec: list[tuple[int, str, str]] = []
    note = (
        f"{len(runs)} run(s) in {len(groups)} group(s); runs in a group differ only by seed. ECE, UCE, referral "
        "and accuracy in %. Claims: paired differences (a - b, same seed) with mean ± sd and a 95% Student-t "
        "interval. a > b / a < b: a paired t test, 'supported' at p < 0.05 in the claimed direction ('not "
        "supported' is not evidence of no difference). a ≡ b: equivalence by two one-sided tests (TOST) against "
        "the margin declared in the config (eval.equivalence): 'equivalent within ±m' at p < 0.05, 'different' "
        "when the t test rejects d = 0, else 'not shown equivalent'. "
        + (
            "p values are Holm-adjusted over each group's claims."
            if holm_correction
            else "p values are not corrected for the number of claims (python -m qbdl.report --holm does)."
        )
    )
    sec.append((1, "qbdl report", note))
    for gi, g in enumerate(groups):
        sec.append((2, f"Group {gi}: {g.label}", f"{len(g.runs)} run(s), seeds {g.seeds}"))
        if len(g.runs) > 1:
            sec.append((3, "Mean ± std over seeds", table(*stats_rows(g))))
            cl = claims(g, holm_correction)
            if cl:
                sec.append((3, f"Claims (paired over seeds): {len(cl)} claims", table(*claim_rows(cl))))
            shift = shift_rows(g)
            if shift is not None:
                sec.append((3, "Data shift: qbnn - bnn (paired over seeds)", table(*shift)))
        for r in g.runs:
            header, rows = table_rows(r.variants, target_accuracy(r))
            sec.append((3, f"Run {r.path} (seed {r.seed})", table(header, rows)))
    return sec


def shift_rows(group: Group, a: str = "qbnn", b: str = "bnn") -> tuple[list[str], list[list[str]]] | None:
    """Header and rows (one per severity) of :func:`shift_claims`; None when the runs have no shift results.

    The p values behind the verdicts are not Holm-adjusted (3 metrics x severities claims).
    """
    cl = shift_claims(group, a, b)
    if not cl:
        return None
    header = ["severity", "n"]
    for m in SHIFT_METRICS:
        header += [f"{title(m)}: {a} - {b} (mean ± sd)", "95% CI", "verdict"]
    rows = []
    for s, claims_s in cl.items():
        row = [str(s), str(max(c.n for c in claims_s))]
        for c in claims_s:
            ms = (
                "-"
                if c.mean is None
                else (
                    f"{fmt(c.mean, c.metric)} ± {fmt(c.sd, c.metric)}"
                    if c.sd is not None
                    else fmt(c.mean, c.metric)
                )
            )
            ci = "-" if c.lo is None else f"[{fmt(c.lo, c.metric)}, {fmt(c.hi, c.metric)}]"
            row += [ms, ci, c.verdict]
        rows.append(row)
    return header, rows


def render_markdown(runs: Sequence[Run], holm_correction: bool = False) -> str:
    """The report as Markdown."""
    sections = _sections(runs, md_table, holm_correction)
    return "\n\n".join(f"{'#' * lvl} {head}\n\n{body}" for lvl, head, body in sections) + "\n"


def render_html(runs: Sequence[Run], holm_correction: bool = False) -> str:
    """The report as a self-contained HTML page."""
    from qbdl.report.html import STYLE

    parts = []
    for lvl, head, body in _sections(runs, _html_table, holm_correction):
        is_table = body.startswith("<table>")
        parts.append(
            f"<h{lvl}>{html.escape(head)}</h{lvl}>" + (body if is_table else f"<p>{html.escape(body)}</p>")
        )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>qbdl report</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )


def write_report(runs: Sequence[Run], out_dir: str | Path, holm_correction: bool = False) -> dict[str, Path]:
    """Write OUT/report.html, OUT/report.md and OUT/summary.json."""
    from qbdl.io import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "html": atomic_write_bytes(out / "report.html", render_html(runs, holm_correction).encode()),
        "md": atomic_write_bytes(out / "report.md", render_markdown(runs, holm_correction).encode()),
        "json": atomic_write_json(out / "summary.json", summary(runs, holm_correction)),
        **speed_plots(runs, out),
    }


def speed_plots(runs: Sequence[Run], out_dir: str | Path) -> dict[str, Path]:
    """Per group with images/s: each uncertainty metric's seed mean against the seed-mean images/s, one point
    per variant (qbdl.report.plots.metric_vs_throughput), as OUT/uncertainty_vs_speed_<group>.png."""
    from qbdl.report import plots

    files = {}
    for gi, g in enumerate(group_runs(runs)):
        means = {v: {m: s.mean for m, s in ms.items()} for v, ms in seed_stats(g).items()}
        if not any(m.get("images_per_s") for m in means.values()):
            continue
        fig = plots.metric_vs_throughput(means)
        files[f"uncertainty_vs_speed_{gi}"] = plots.save_figure(fig, Path(out_dir) / f"uncertainty_vs_speed_{gi}.png")
    return files
