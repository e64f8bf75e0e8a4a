"""The comparison table: one row per variant (OOD AUROC: first set; near/far: group means; eval.score)."""

from __future__ import annotations

# (column title, results key, formatter). ECE/UCE/referral are fractions in results.json, shown in %.
COLUMNS = [
    ("accuracy %", "accuracy", lambda v: f"{100 * v:.2f}"),
    ("NLL", "nll", lambda v: f"{v:.4f}"),
    ("ECE %", "ece", lambda v: f"{100 * v:.2f}"),
    ("UCE %", "uce", lambda v: f"{100 * v:.2f}"),
    ("mean MI", "mi_mean", lambda v: f"{v:.4f}"),
    ("referral %", "referral_rate_at_target", lambda v: f"{100 * v:.1f}"),
    ("AUGRC %", "augrc", lambda v: f"{100 * v:.3f}"),
    ("OOD AUROC", "ood_auroc", lambda v: f"{v:.3f}"),
    ("near", "ood_near_auroc", lambda v: f"{v:.3f}"),
    ("far", "ood_far_auroc", lambda v: f"{v:.3f}"),
    ("size MiB", "size_bytes", lambda v: f"{v / 2**20:.2f}"),
    ("img/s", "images_per_s", lambda v: f"{v:.0f}"),
]


def table_rows(variants: dict, target: float | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the comparison table."""
    header = ["variant"] + [
        f"referral % @{100 * target:g}" if (key == "referral_rate_at_target" and target) else title
        for title, key, _ in COLUMNS
    ]
    rows = []
    for name, res in variants.items():
        row = [name]
        for _, key, fmt in COLUMNS:
            val = res.get(key)
            row.append("-" if val is None else fmt(val))
        rows.append(row)
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
