"""The comparison table: one row per variant, one column per registry entry with `table=True`.

OOD AUROC: the first set; near/far: group means; ranked by eval.score. Titles and formats: the registry.
"""

from __future__ import annotations

from qbdl.metrics.registry import metric_spec, table_keys


def column_title(key: str, target: float | None = None) -> str:
    """A column's heading (the registry's); the referral column names the target accuracy when given."""
    title = metric_spec(key).heading
    return f"{title} @{100 * target:g}" if (key == "referral_rate_at_target" and target) else title


def format_cell(key: str, value: float | None) -> str:
    """One value in the registry's table format ('-' when missing)."""
    return "-" if value is None else metric_spec(key).format(value)


def table_rows(variants: dict, target: float | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the comparison table."""
    columns = table_keys()  # the registry's table entries, read now: a metric registered later is a column too
    header = ["variant"] + [column_title(key, target) for key in columns]
    rows = [[name] + [format_cell(key, res.get(key)) for key in columns] for name, res in variants.items()]
    return header, rows


def format_table(variants: dict, target: float | None = None) -> str:
    """Plain-text table for the console."""
    header, rows = table_rows(variants, target)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    sep = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([sep, line(header), sep, *map(line, rows), sep, *int8_notes(variants)])


def int8_notes(variants: dict) -> list[str]:
    """One line per INT8 variant whose activations use the reduced 0..127 range, saying why."""
    return [
        f"{name}: INT8 activations in 0..127 (reduced range) on {', '.join(r['int8']['kernel_families'])}: "
        + "; ".join(r["int8"]["why"])
        for name, r in variants.items()
        if isinstance(r.get("int8"), dict) and r["int8"].get("reduced_range")
    ]


def markdown_table(variants: dict, target: float | None = None) -> str:
    """GitHub-flavoured Markdown table."""
    header, rows = table_rows(variants, target)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)
