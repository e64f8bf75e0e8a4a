"""Pure summaries of data-shift results (no torch, no Lightning): per-severity box statistics and mCE.

Input everywhere: ``results[variant][corruption][severity] = {metric: value}`` (severity an int or
its string, as after a JSON round trip).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Results = Mapping[str, Mapping[str, Mapping[Any, Mapping[str, float]]]]
STATS = ("mean", "min", "q1", "median", "q3", "max")


def _sev(s: Any) -> int:
    return int(s)


def box_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, min, q1, median, q3, max (numpy's linear quantiles) and n of the finite values."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(float(x))], dtype=float)
    if v.size == 0:
        return {k: math.nan for k in STATS} | {"n": 0}
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return {
        "mean": float(v.mean()),
        "min": float(v.min()),
        "q1": float(q1),
        "median": float(med),
        "q3": float(q3),
        "max": float(v.max()),
        "n": int(v.size),
    }


def severities(results: Results) -> list[int]:
    """Every severity that occurs, sorted."""
    return sorted({_sev(s) for per_c in results.values() for per_s in per_c.values() for s in per_s})


def metric_values(results: Results, variant: str, metric: str, severity: int) -> dict[str, float]:
    """``{corruption: value}`` of one variant, metric and severity (corruptions lacking it are left out)."""
    out = {}
    for c, per_s in results[variant].items():
        for s, m in per_s.items():
            if _sev(s) == int(severity) and metric in m:
                out[c] = float(m[metric])
    return out


def severity_summary(
    results: Results, metrics: Sequence[str] | None = None
) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """``{variant: {severity: {metric: box_stats over corruptions}}}``; metrics default to all present."""
    out: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    for v, per_c in results.items():
        names = (
            list(metrics)
            if metrics is not None
            else sorted({k for per_s in per_c.values() for m in per_s.values() for k in m})
        )
        out[v] = {}
        for s in severities({v: per_c}):
            out[v][s] = {k: box_stats(list(metric_values(results, v, k, s).values())) for k in names}
    return out


def _error(m: Mapping[str, float], error_key: str, accuracy_key: str) -> float:
    if error_key in m:
        return float(m[error_key])
    if accuracy_key in m:
        return 1.0 - float(m[accuracy_key])
    raise KeyError(f"a result has neither '{error_key}' nor '{accuracy_key}': {sorted(m)}")


def corruption_errors(
    results: Results,
    baseline: str,
    error_key: str = "error",
    accuracy_key: str = "acc",
    clean: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Hendrycks & Dietterich (2019) corruption errors of every variant against ``baseline``.

    ``CE_c = sum_s E(variant, c, s) / sum_s E(baseline, c, s)``, ``mCE = mean_c CE_c`` over the
    corruptions both have (with the severities both have); ``mean_error`` is the plain mean of
    E over corruptions and severities. The error is ``error_key``, else ``1 - accuracy_key``.
    With ``clean = {variant: {metric: value}}`` also the relative mCE:
    ``relCE_c = sum_s (E_s - E_clean) / sum_s (E_base_s - E_base_clean)``.
    A baseline with zero summed error makes that CE nan. Returns ``{variant: {mCE, mean_error,
    CE: {c: ...}, relative_mCE?, relative_CE?}}``.
    """
    if baseline not in results:
        raise KeyError(f"baseline variant {baseline!r} not in results (have {sorted(results)})")
    base = results[baseline]
    out: dict[str, dict[str, Any]] = {}
    for v, per_c in results.items():
        ce: dict[str, float] = {}
        rel: dict[str, float] = {}
        errs: list[float] = []
        for c, per_s in per_c.items():
            for m in per_s.values():
                errs.append(_error(m, error_key, accuracy_key))
            if c not in base:
                continue
            b = {_sev(s): _error(m, error_key, accuracy_key) for s, m in base[c].items()}
            e = {_sev(s): _error(m, error_key, accuracy_key) for s, m in per_s.items()}
            common = sorted(set(b) & set(e))
            if not common:
                continue
            num, den = sum(e[s] for s in common), sum(b[s] for s in common)
            ce[c] = num / den if den > 0 else math.nan
            if clean is not None and v in clean and baseline in clean:
                ec = _error(clean[v], error_key, accuracy_key)
                bc = _error(clean[baseline], error_key, accuracy_key)
                rden = sum(b[s] - bc for s in common)
                rel[c] = sum(e[s] - ec for s in common) / rden if rden != 0 else math.nan
        entry: dict[str, Any] = {
            "mCE": float(np.mean(list(ce.values()))) if ce else math.nan,
            "mean_error": float(np.mean(errs)) if errs else math.nan,
            "CE": ce,
        }
        if clean is not None:
            entry["relative_mCE"] = float(np.mean(list(rel.values()))) if rel else math.nan
            entry["relative_CE"] = rel
        out[v] = entry
    return out


def paired_differences(
    results: Results, metric: str, minuend: str, subtrahend: str
) -> dict[int, dict[str, float]]:
    """``{severity: {corruption: results[minuend] - results[subtrahend]}}`` for pairs both variants have."""
    out: dict[int, dict[str, float]] = {}
    for s in severities({k: results[k] for k in (minuend, subtrahend)}):
        a = metric_values(results, minuend, metric, s)
        b = metric_values(results, subtrahend, metric, s)
        out[s] = {c: a[c] - b[c] for c in a if c in b}
    return out
