"""The data-shift console table: per variant, the registry's shift metrics vs severity (mean over corruptions), mCE."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qbdl.experiment.shape import shift_parts
from qbdl.metrics.registry import metric_spec, shift_keys


def mean_over_corruptions(per_c: Mapping[str, Any], metric: str, severity: int) -> float:
    """The mean of `metric` at `severity` over a variant's corruptions (NaN when none is finite)."""
    vals = [
        float(m[metric])
        for per_s in per_c.values()
        for s, m in per_s.items()
        if int(s) == int(severity) and m.get(metric) is not None
    ]
    vals = [x for x in vals if math.isfinite(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _cell(key: str, x: Any) -> str:
    if x is None or not math.isfinite(float(x)):
        return "-"
    return metric_spec(key).format(float(x))


def _mce(x: Any) -> str:
    return "-" if x is None or not math.isfinite(float(x)) else f"{float(x):.4f}"


def shift_table(shift: Mapping[str, Any]) -> str:
    """A console table: per variant, each registry shift metric vs severity (mean over corruptions), and mCE."""
    parts = shift_parts(shift)
    res, meta, mce = parts["cells"], parts["meta"], parts["mce"]
    if not res:
        return "data shift: no results"
    sevs = [
        int(s)
        for s in meta.get("severities")
        or sorted({int(s) for p in res.values() for d in p.values() for s in d})
    ]
    corrs = meta.get("corruptions") or sorted({c for p in res.values() for c in p})
    base = meta.get("baseline")
    header = ["variant", "metric", *(f"sev {s}" for s in sevs), f"mCE (vs {base})" if base else "mCE"]
    rows = []
    for v, per_c in res.items():
        for i, key in enumerate(shift_keys()):
            cells = [_cell(key, mean_over_corruptions(per_c, key, s)) for s in sevs]
            extra = _mce((mce.get(v) or {}).get("mCE")) if i == 0 and mce else ""
            rows.append([v if i == 0 else "", metric_spec(key).label, *cells, extra])
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(x.ljust(w) if k < 2 else x.rjust(w) for k, (x, w) in enumerate(zip(r, widths)))

    title = f"data shift: {len(corrs)} corruption(s), mean over corruptions per severity"
    return "\n".join([title, line(header), "-" * len(line(header)), *map(line, rows)])
