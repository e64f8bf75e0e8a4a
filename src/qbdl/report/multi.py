"""Several runs together: load them, group runs that differ only by seed, mean ± std, paired-difference claims.

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

import html
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qbdl.report.table import COLUMNS, table_rows

# Metrics summarised over seeds: key -> (title, scale for display, better: "higher" | "lower" | None).
METRICS: dict[str, tuple[str, float, str | None]] = {
    "accuracy": ("accuracy %", 100.0, "higher"),
    "nll": ("NLL", 1.0, "lower"),
    "brier": ("Brier", 1.0, "lower"),
    "ece": ("ECE %", 100.0, "lower"),
    "uce": ("UCE %", 100.0, "lower"),
    "mi_mean": ("mean MI", 1.0, None),
    "referral_rate_at_target": ("referral %", 100.0, "lower"),
    "augrc": ("AUGRC %", 100.0, "lower"),
    "ood_auroc": ("OOD AUROC", 1.0, "higher"),
    "size_bytes": ("size MiB", 1.0 / 2**20, "lower"),
    "images_per_s": ("img/s", 1.0, "higher"),
}
# The paper's claims: (variant a, variant b, metrics); a is claimed better than b on each metric.
PAPER_CLAIMS: list[tuple[str, str, tuple[str, ...]]] = [
    ("bnn", "dnn", ("ood_auroc", "uce", "referral_rate_at_target")),
    ("bnn", "bnn_mean", ("ood_auroc", "uce", "referral_rate_at_target")),
]
# The temperature-scaled DNN is the baseline a practitioner would use: BNN claims are made against it too.
PAPER_CLAIMS.append(("bnn", "dnn_ts", ("ood_auroc", "uce", "referral_rate_at_target")))
# QBNN vs BNN: every metric, equivalence ("does quantization keep it?").
QUANT_CLAIM = ("qbnn", "bnn", tuple(METRICS))
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
# Config keys that do not define an experiment (paths, logging, seeds that follow the run seed).
IGNORED_PREFIXES = (
    "hydra",
    "paths",
    "logger",
    "checkpoint",
    "threads",
    "optimize_metric",
    "trainer.enable_progress_bar",
)
IGNORED_SUFFIXES = ("out_dir", "save_dir", "default_root_dir", "dirpath")
SEED_KEYS = (
    "seed",
    "eval.seed",
    "quant.seed",
    "eval.callback.seed",
    "shift.seed",
    "eval.callback.shift.seed",
)


@dataclass
class Run:
    """One run directory and its results.json."""

    path: Path
    results: dict
    unresolved: dict | None = None  # .hydra/config.yaml when present (interpolations such as ${seed} kept)

    @property
    def seed(self) -> Any:
        """The run's seed (config key `seed`)."""
        return (self.results.get("config") or {}).get("seed")

    @property
    def variants(self) -> dict:
        """{variant: metrics}."""
        return self.results.get("variants") or {}


@dataclass
class Group:
    """Runs whose configurations differ only by seed."""

    runs: list[Run]
    key: dict = field(default_factory=dict)  # the flattened config shared by the runs (seed keys removed)
    label: str = ""  # the settings that distinguish this group from the others

    @property
    def seeds(self) -> list:
        """Seeds of the runs, in run order."""
        return [r.seed for r in self.runs]


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


def load_run(path: str | Path) -> Run:
    """One run directory (with results.json)."""
    path = Path(path)
    results = json.loads((path / "results.json").read_text())
    unresolved = None
    hydra_cfg = path / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        from omegaconf import OmegaConf

        unresolved = OmegaConf.to_container(OmegaConf.load(hydra_cfg), resolve=False)
    return Run(path, results, unresolved)


def _job_order(p: Path) -> tuple:
    return (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories: each path itself if it holds results.json, else its subdirs that do (a Hydra multirun)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").exists():
            found.append(p)
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such run directory")
        subs = sorted((d for d in p.iterdir() if (d / "results.json").exists()), key=_job_order)
        if not subs:
            raise FileNotFoundError(
                f"{p} holds no results.json, and none of its subdirectories does (is the run finished?)"
            )
        found += subs
    return found


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run under `paths` (run dirs or Hydra multirun dirs)."""
    return [load_run(p) for p in find_run_dirs(paths)]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': leaf} of a nested dict (lists kept as leaves)."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def experiment_key(run: Run) -> dict[str, Any]:
    """The run's flattened config without its seed(s), paths and logging: equal keys = same experiment."""
    if run.unresolved is not None:
        flat = flatten(run.unresolved)
        drop_seed = {"seed"}  # the others are ${seed} interpolations in the unresolved config
    else:
        flat = flatten(run.results.get("config") or {})
        drop_seed = set(SEED_KEYS)
    out = {}
    for k, v in flat.items():
        if k in drop_seed or k.startswith(IGNORED_PREFIXES) or k.endswith(IGNORED_SUFFIXES):
            continue
        out[k] = v
    return out


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups of runs whose configurations differ only by seed, in first-seen order."""
    groups: dict[str, Group] = {}
    for r in runs:
        key = experiment_key(r)
        sig = json.dumps(key, sort_keys=True, default=str)
        groups.setdefault(sig, Group([], key)).runs.append(r)
    out = list(groups.values())
    varying = sorted(
        {k for g in out for k in g.key if len({json.dumps(h.key.get(k), default=str) for h in out}) > 1}
    )
    for i, g in enumerate(out):
        g.label = ", ".join(f"{k}={g.key.get(k)}" for k in varying) or f"group {i}"
    return out


def get_metric(res: dict, metric: str) -> float | None:
    """A metric of one variant; dotted keys reach nested ones (e.g. 'ood.photos.auroc')."""
    val: Any = res
    for part in metric.split("."):
        if not isinstance(val, dict):
            return None
        val = val.get(part)
    if isinstance(val, bool) or not isinstance(val, int | float) or math.isnan(val):
        return None
    return float(val)


def mean_std(values: Sequence[float | None]) -> Stat:
    """Mean and sample standard deviation (ddof=1; None for n < 2) of the non-missing values."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return Stat(None, None, 0)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return Stat(m, sd, n)


GROUP_METRICS = {"ood_near_auroc": "OOD AUROC (near)", "ood_far_auroc": "OOD AUROC (far)"}


def metric_names(group: Group) -> list[str]:
    """METRICS, the near/far OOD means and the per-set OOD AUROCs ('ood.<set>.auroc') present in the group."""
    sets = sorted({s for r in group.runs for v in r.variants.values() for s in (v.get("ood") or {})})
    present = {k for r in group.runs for v in r.variants.values() for k in GROUP_METRICS if k in v}
    return [*METRICS, *(k for k in GROUP_METRICS if k in present), *(f"ood.{s}.auroc" for s in sets)]


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


def _better(metric: str) -> str | None:
    if metric in METRICS:
        return METRICS[metric][2]
    return "higher" if metric.endswith("auroc") else None


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
            return f"equivalent within ±{_fmt(c.margin, c.metric)}"
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

    better = _better(metric) if better == "auto" else better
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
    """The paper's claims that this group's variants allow (BNN vs DNN, DNN_ts and bnn_mean; QBNN ≡ BNN).

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
    a, b, metrics = QUANT_CLAIM
    if {a, b} <= present:
        m_by = margins(group)
        metrics = [*metrics, *(m for m in metric_names(group) if m in GROUP_METRICS)]
        out += [paired_claim(group, a, b, m, better=None, margin=m_by.get(m)) for m in metrics]
    if holm_correction:
        tested = [c for c in out if c.p is not None]
        # equivalence claims' "different" is its own family: Holm over their two-sided p values
        eq = [c for c in tested if c.kind == "equivalence"]
        p_diff_adj = dict(zip(map(id, eq), holm([c.p_diff for c in eq])))
        for c, pa in zip(tested, holm([c.p for c in tested])):
            c.p_adj = pa
            c.verdict = _verdict(c, pa, p_diff_adj.get(id(c)))
    return out


# ---------------------------------------------------------------- formatting


def _title(metric: str) -> str:
    if metric in METRICS:
        return METRICS[metric][0]
    if metric in GROUP_METRICS:
        return GROUP_METRICS[metric]
    parts = metric.split(".")
    return f"OOD AUROC ({parts[1]})" if len(parts) == 3 else metric


def _scale(metric: str) -> float:
    return METRICS[metric][1] if metric in METRICS else 1.0


def _fmt(x: float | None, metric: str) -> str:
    if x is None:
        return "-"
    x *= _scale(metric)
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def format_stat(s: Stat, metric: str) -> str:
    """'mean ± std' in the metric's display unit."""
    if s.mean is None:
        return "-"
    if s.std is None:
        return _fmt(s.mean, metric)
    return f"{_fmt(s.mean, metric)} ± {_fmt(s.std, metric)}"


def stats_rows(group: Group) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per variant, 'mean ± std' per metric."""
    st = seed_stats(group)
    names = metric_names(group)
    header = ["variant", "n", *(_title(m) for m in names)]
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
            else (f"{_fmt(c.mean, c.metric)} ± {_fmt(c.sd, c.metric)}" if c.sd else _fmt(c.mean, c.metric))
        )
        ci = "-" if c.lo is None else f"[{_fmt(c.lo, c.metric)}, {_fmt(c.hi, c.metric)}]"
        margin = "-" if c.margin is None else f"±{_fmt(c.margin, c.metric)}"
        row = [what, _title(c.metric), str(c.n), ms, ci, margin, _p(c.p), *([_p(c.p_adj)] * holm_on)]
        rows.append([*row, c.verdict])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
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
            header, rows = table_rows(r.variants, _target(r))
            sec.append((3, f"Run {r.path} (seed {r.seed})", table(header, rows)))
    return sec


SHIFT_METRICS = ("accuracy", "ece", "uce")


def shift_claims(group: Group, a: str = "qbnn", b: str = "bnn") -> dict[int, list[Claim]]:
    """``{severity: [Claim per SHIFT_METRICS]}`` of the runs' data-shift results (results["shift"]).

    Per run and severity the difference is the mean over corruptions of the paired per-corruption
    differences ``a - b``; over the seeds these give mean ± sd, the 95% t interval and the TOST
    equivalence verdict against the group's margins (as the clean QBNN ≡ BNN claims). Empty without
    shift results for both variants.
    """
    from qbdl.shift_summary import paired_differences

    per_run: list[dict[int, dict[str, float]]] = []
    for r in group.runs:
        res = {k: v for k, v in (r.results.get("shift") or {}).items() if not str(k).startswith("_")}
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


def shift_rows(group: Group, a: str = "qbnn", b: str = "bnn") -> tuple[list[str], list[list[str]]] | None:
    """Header and rows (one per severity) of :func:`shift_claims`; None when the runs have no shift results.

    The p values behind the verdicts are not Holm-adjusted (3 metrics x severities claims).
    """
    cl = shift_claims(group, a, b)
    if not cl:
        return None
    header = ["severity", "n"]
    for m in SHIFT_METRICS:
        header += [f"{_title(m)}: {a} - {b} (mean ± sd)", "95% CI", "verdict"]
    rows = []
    for s, claims_s in cl.items():
        row = [str(s), str(max(c.n for c in claims_s))]
        for c in claims_s:
            ms = (
                "-"
                if c.mean is None
                else (
                    f"{_fmt(c.mean, c.metric)} ± {_fmt(c.sd, c.metric)}"
                    if c.sd is not None
                    else _fmt(c.mean, c.metric)
                )
            )
            ci = "-" if c.lo is None else f"[{_fmt(c.lo, c.metric)}, {_fmt(c.hi, c.metric)}]"
            row += [ms, ci, c.verdict]
        rows.append(row)
    return header, rows


def render_markdown(runs: Sequence[Run], holm_correction: bool = False) -> str:
    """The report as Markdown."""
    sections = _sections(runs, _md_table, holm_correction)
    return "\n\n".join(f"{'#' * lvl} {head}\n\n{body}" for lvl, head, body in sections) + "\n"


def render_html(runs: Sequence[Run], holm_correction: bool = False) -> str:
    """The report as a self-contained HTML page."""
    from qbdl.report.html import _STYLE

    parts = []
    for lvl, head, body in _sections(runs, _html_table, holm_correction):
        is_table = body.startswith("<table>")
        parts.append(
            f"<h{lvl}>{html.escape(head)}</h{lvl}>" + (body if is_table else f"<p>{html.escape(body)}</p>")
        )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>qbdl report</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
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
    }


SWEEP_METRICS = ("accuracy", "nll", "uce", "referral_rate_at_target", "ood_auroc")


def _overrides(run: Run) -> dict[str, str]:
    ov_file = run.path / ".hydra" / "overrides.yaml"
    if not ov_file.exists():
        return {}
    from omegaconf import OmegaConf

    items = [str(o) for o in OmegaConf.load(ov_file)]
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in items)


def sweep_rows(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """One row per (job, variant): the overrides that vary between jobs and the headline metrics."""
    cols = {key: (title, fmt) for title, key, fmt in COLUMNS}
    ovs = [_overrides(r) for r in runs]
    keys = sorted({k for o in ovs for k in o if len({o2.get(k) for o2 in ovs}) > 1})
    header = ["job", *keys, "variant", *(cols[m][0] for m in SWEEP_METRICS)]
    rows = []
    for r, ov in zip(runs, ovs):
        for v, res in r.variants.items():
            vals = [("-" if res.get(m) is None else cols[m][1](res[m])) for m in SWEEP_METRICS]
            rows.append([r.path.name, *(ov.get(k, "-") for k in keys), v, *vals])
    return header, rows


def sweep_markdown(runs: Sequence[Run], best: dict | None = None) -> str:
    """The sweep summary table as Markdown (plus the optimizer's best point when given)."""
    text = "# Sweep summary\n\n" + _md_table(*sweep_rows(runs)) + "\n"
    if best:
        text += "\n## Best\n\n" + "\n".join(f"- {k}: {v}" for k, v in best.items()) + "\n"
    return text
