"""Statistics over the seeds of a group: mean ± std per metric and the paired-difference claims.

A claim compares two variants of the same run (same seed, same data split) on one metric; over the seeds of
a group the paired differences d_i = metric(a, run_i) - metric(b, run_i) give mean ± sd and a 95% Student-t
interval mean ± t(0.975, n-1) * sd / sqrt(n).

Two kinds of claim:
* superiority ("a is better than b"): the paired t test; "supported" when p < 0.05 in the claimed direction.
  A non-significant difference is "not supported", never evidence of "no difference".
* equivalence ("quantization keeps the metric"): two one-sided tests (TOST, Schuirmann 1987) against a
  margin m declared in the run's config before it ran (eval.equivalence): "equivalent within ±m" when both
  H0: d <= -m and H0: d >= +m are rejected (p = max of the two one-sided p values < 0.05, i.e. the 90%
  interval lies inside ±m); "different" when the two-sided test rejects d = 0 and equivalence is not shown;
  else "not shown equivalent". Metrics without a margin (size, speed) get the difference test only.
Each table states its number of claims; with holm=True the p values of a group's claims are Holm-adjusted
(family-wise error 0.05 over all of them). Speed claims between variants that ran on different devices
are refused ("not comparable"): the speed figures to quote come from python -m qbdl.bench.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qbdl.experiment.shape import shift_parts
from qbdl.metrics.registry import metric_spec, seed_keys
from qbdl.report.multi.runs import Group, Run, get_metric


def seed_metrics() -> tuple[str, ...]:
    """Metrics summarised over seeds, in column order: the registry's `seeds` entries, read at call time."""
    return seed_keys()


# The near/far OOD group means, summarised and compared when the runs have them.
GROUP_METRICS = ("ood_near_auroc", "ood_far_auroc")
# The paper's claims: (variant a, variant b, metrics); a is claimed better than b on each metric.
PAPER_CLAIMS: list[tuple[str, str, tuple[str, ...]]] = [
    ("bnn", "dnn", ("ood_auroc", "uce", "referral_rate_at_target")),
    ("bnn", "bnn_mean", ("ood_auroc", "uce", "referral_rate_at_target")),
]
# The temperature-scaled DNN is the baseline a practitioner would use: BNN claims are made against it too.
PAPER_CLAIMS.append(("bnn", "dnn_ts", ("ood_auroc", "uce", "referral_rate_at_target")))
# QBNN vs BNN on every seed metric (seed_metrics()), equivalence ("does quantization keep it?").
QUANT_PAIR = ("qbnn", "bnn")
# QBNN vs the INT8 baselines deployed instead (deep ensemble, MC dropout, last-layer Laplace; issue 33): on each
# metric a superiority claim "qbnn is better" (a t test; "contradicted" where the baseline is better) and, where
# the metric has an equivalence margin, a TOST equivalence claim with the same margins as QBNN ≡ BNN.
BASELINE_METRICS = ("accuracy", "nll", "ece", "uce", "augrc", "referral_rate_at_target", "ood_auroc",
                    "images_per_s", "resident_bytes")  # fmt: skip
BASELINE_CLAIMS: list[tuple[str, str, tuple[str, ...]]] = [
    ("qbnn", b, BASELINE_METRICS) for b in ("qens", "qmcd", "qlla")
]
# Equivalence margins when a run's config declares none (eval.equivalence), in the metric's own unit.
DEFAULT_MARGINS = {
    "accuracy": 0.005,
    "ece": 0.01,
    "uce": 0.01,
    "nll": 0.01,
    "ood_auroc": 0.02,
    "referral_rate_at_target": 0.01,
}
ALPHA = 0.05
SHIFT_METRICS = ("accuracy", "ece", "uce")


@dataclass
class Stat:
    """Mean, sample standard deviation and count of one metric."""

    mean: float | None
    std: float | None
    n: int


@dataclass
class Claim:
    """Paired differences a - b over the seeds of a group on one metric: 95% t interval, test, verdict."""

    a: str
    b: str
    metric: str
    better: str | None
    diffs: list[float]
    mean: float | None
    sd: float | None
    lo: float | None
    hi: float | None
    verdict: str
    kind: str = "superiority"  # superiority | difference | equivalence
    margin: float | None = None  # equivalence margin (metric units)
    p: float | None = None  # two-sided t test (superiority/difference) or TOST p value (equivalence)
    p_diff: float | None = None  # two-sided t test of d = 0 (for an equivalence claim's "different")
    p_adj: float | None = None  # after Holm's correction over the group's claims (None: not applied)

    @property
    def n(self) -> int:
        """Number of paired seeds."""
        return len(self.diffs)


def mean_std(values: Sequence[float | None]) -> Stat:
    """Mean and sample standard deviation (ddof=1; None for n < 2) of the non-missing values."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return Stat(None, None, 0)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return Stat(m, sd, n)


def metric_names(group: Group) -> list[str]:
    """seed_metrics(), the near/far OOD means and the per-set OOD AUROCs ('ood.<set>.auroc') present in the group."""
    sets = sorted({s for r in group.runs for v in r.variants.values() for s in (v.get("ood") or {})})
    present = {k for r in group.runs for v in r.variants.values() for k in GROUP_METRICS if k in v}
    return [*seed_metrics(), *(k for k in GROUP_METRICS if k in present), *(f"ood.{s}.auroc" for s in sets)]


def seed_stats(group: Group) -> dict[str, dict[str, Stat]]:
    """{variant: {metric: Stat over the group's seeds}}."""
    variants: list[str] = []
    for r in group.runs:
        variants += [v for v in r.variants if v not in variants]
    return {
        v: {
            m: mean_std([get_metric(r.variants.get(v, {}), m) for r in group.runs])
            for m in metric_names(group)
        }
        for v in variants
    }


def direction(metric: str) -> str | None:
    """The metric's better direction from the registry ("higher" | "lower"; None: unregistered or neither)."""
    return metric_spec(metric).better


def fmt(x: float | None, metric: str) -> str:
    """A value in the metric's display unit, four significant digits ('-' when missing)."""
    return "-" if x is None else metric_spec(metric).compact(x)


def _diffs(group: Group, a: str, b: str, metric: str) -> list[float]:
    out = []
    for r in group.runs:
        xa, xb = get_metric(r.variants.get(a, {}), metric), get_metric(r.variants.get(b, {}), metric)
        if xa is not None and xb is not None:
            out.append(xa - xb)
    return out


def _devices(group: Group, a: str, b: str) -> set[tuple]:
    return {(r.variants.get(a, {}).get("device"), r.variants.get(b, {}).get("device")) for r in group.runs}


def _t_test(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, sd, two-sided p of mean = 0) of paired differences (n >= 2)."""
    from scipy import stats

    s = mean_std(diffs)
    if s.std == 0.0:
        return s.mean, 0.0, 1.0 if s.mean == 0.0 else 0.0
    t = s.mean / (s.std / math.sqrt(s.n))
    return s.mean, s.std, float(2 * stats.t.sf(abs(t), s.n - 1))


def tost_p(diffs: list[float], margin: float) -> float:
    """TOST p value for |mean d| < margin: the larger of the two one-sided t tests' p values."""
    from scipy import stats

    s = mean_std(diffs)
    if s.std == 0.0:
        return 0.0 if abs(s.mean) < margin else 1.0
    se = s.std / math.sqrt(s.n)
    p_low = stats.t.sf((s.mean + margin) / se, s.n - 1)  # H0: d <= -margin
    p_high = stats.t.cdf((s.mean - margin) / se, s.n - 1)  # H0: d >= +margin
    return float(max(p_low, p_high))


def _verdict(c: Claim, p: float | None, p_diff: float | None) -> str:
    if p is None:
        return c.verdict
    if c.kind == "equivalence":
        if p < ALPHA:
            return f"equivalent within ±{fmt(c.margin, c.metric)}"
        return "different" if p_diff is not None and p_diff < ALPHA else "not shown equivalent"
    if p >= ALPHA:
        return "not supported"
    if c.better is None:
        return f"supported ({c.a} {'higher' if c.mean > 0 else 'lower'})"
    return "supported" if (c.mean > 0) == (c.better == "higher") else "contradicted (opposite sign)"


def paired_claim(
    group: Group,
    a: str,
    b: str,
    metric: str,
    better: str | None = "auto",
    level: float = 0.95,
    margin: float | None = None,
) -> Claim:
    """Paired differences a - b over the group's seeds: the t interval at `level`, a test and its verdict.

    margin given: an equivalence claim (TOST against ±margin); else a superiority claim when the metric has
    a better direction, a two-sided difference claim when it has none (better=None).
    """
    from scipy import stats

    better = direction(metric) if better == "auto" else better
    kind = "equivalence" if margin is not None else ("difference" if better is None else "superiority")
    diffs = _diffs(group, a, b, metric)
    s = mean_std(diffs)
    c = Claim(a, b, metric, better, diffs, s.mean, s.std, None, None, "", kind, margin)
    if metric == "images_per_s" and len({d for pair in _devices(group, a, b) for d in pair}) > 1:
        pairs = sorted({f"{x} vs {y}" for x, y in _devices(group, a, b)})
        c.verdict = f"not comparable ({', '.join(pairs)}: speed from python -m qbdl.bench)"
        return c
    if s.n < 2 or s.std is None:
        c.verdict = f"insufficient seeds (n={s.n})"
        return c
    half = float(stats.t.ppf(0.5 + level / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    c.lo, c.hi = s.mean - half, s.mean + half
    _, _, c.p_diff = _t_test(diffs)
    c.p = tost_p(diffs, margin) if kind == "equivalence" else c.p_diff
    c.verdict = _verdict(c, c.p, c.p_diff)
    return c


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values (same order as `ps`)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adj, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adj[i] = running
    return adj


def margins(group: Group) -> dict[str, float]:
    """The equivalence margins the group's runs declared (eval.equivalence), over the defaults."""
    declared = ((group.runs[0].results.get("config") or {}).get("eval") or {}).get("equivalence") or {}
    out = {**DEFAULT_MARGINS, **{k: float(v) for k, v in declared.items() if v is not None}}
    return out | {k: out.get(k, out["ood_auroc"]) for k in GROUP_METRICS}  # near/far: the OOD AUROC margin


def claims(group: Group, holm_correction: bool = False) -> list[Claim]:
    """The claims this group's variants allow (BNN vs DNN, DNN_ts, bnn_mean; QBNN ≡ BNN; QBNN vs qens/qmcd/qlla).

    holm_correction: adjust the p values of all these claims together (Holm) and give verdicts from them.
    """
    present = {v for r in group.runs for v in r.variants}
    out = []
    for a, b, metrics in PAPER_CLAIMS:
        if {a, b} <= present:
            extra = (
                [m for m in metric_names(group) if m.startswith("ood.") or m in GROUP_METRICS]
                if "ood_auroc" in metrics
                else []
            )
            out += [paired_claim(group, a, b, m) for m in [*metrics, *extra]]
    (a, b), metrics = QUANT_PAIR, seed_metrics()
    if {a, b} <= present:
        m_by = margins(group)
        metrics = [*metrics, *(m for m in metric_names(group) if m in GROUP_METRICS)]
        out += [paired_claim(group, a, b, m, better=None, margin=m_by.get(m)) for m in metrics]
    out += baseline_claims(group, present)
    if holm_correction:
        tested = [c for c in out if c.p is not None]
        # equivalence claims' "different" is its own family: Holm over their two-sided p values
        eq = [c for c in tested if c.kind == "equivalence"]
        p_diff_adj = dict(zip(map(id, eq), holm([c.p_diff for c in eq])))
        for c, pa in zip(tested, holm([c.p for c in tested])):
            c.p_adj = pa
            c.verdict = _verdict(c, pa, p_diff_adj.get(id(c)))
    return out


def baseline_claims(group: Group, present: set[str] | None = None) -> list[Claim]:
    """QBNN vs qens / qmcd / qlla (BASELINE_CLAIMS): superiority per metric, equivalence where a margin exists."""
    present = present if present is not None else {v for r in group.runs for v in r.variants}
    m_by = margins(group)
    out = []
    for a, b, metrics in BASELINE_CLAIMS:
        if not {a, b} <= present:
            continue
        for m in [*metrics, *(k for k in metric_names(group) if k in GROUP_METRICS)]:
            out.append(paired_claim(group, a, b, m))
            if m in m_by:
                out.append(paired_claim(group, a, b, m, better=None, margin=m_by[m]))
    return out


def shift_claims(group: Group, a: str = "qbnn", b: str = "bnn") -> dict[int, list[Claim]]:
    """``{severity: [Claim per SHIFT_METRICS]}`` of the runs' data-shift results (results["shift"]).

    Per run and severity the difference is the mean over corruptions of the paired per-corruption
    differences ``a - b``; over the seeds these give mean ± sd, the 95% t interval and the TOST
    equivalence verdict against the group's margins (as the clean QBNN ≡ BNN claims). Empty without
    shift results for both variants.
    """
    from qbdl.metrics.shift import paired_differences

    per_run: list[dict[int, dict[str, float]]] = []
    for r in group.runs:
        res = shift_parts(r.results.get("shift") or {})["cells"]
        if a not in res or b not in res:
            continue
        means: dict[int, dict[str, float]] = {}
        for m in SHIFT_METRICS:
            for s, d in paired_differences(res, m, a, b).items():
                vals = [x for x in d.values() if x is not None and math.isfinite(x)]
                if vals:
                    means.setdefault(s, {})[m] = sum(vals) / len(vals)
        per_run.append(means)
    sevs = sorted({s for means in per_run for s in means})
    m_by = margins(group)
    out: dict[int, list[Claim]] = {}
    for s in sevs:
        # one pseudo-run per seed whose variants hold the severity's corruption-mean differences
        runs = [
            Run(Path(f"seed{i}"), {"variants": {a: means.get(s, {}), b: {m: 0.0 for m in means.get(s, {})}}})
            for i, means in enumerate(per_run)
        ]
        g = Group(runs)
        out[s] = [paired_claim(g, a, b, m, better=None, margin=m_by.get(m)) for m in SHIFT_METRICS]
    return out
