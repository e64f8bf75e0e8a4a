"""The one registry of result metrics: key, display label, scale, table decimals and better direction.

Every value :func:`qbdl.metrics.summarize` returns and every per-variant figure the experiment adds to
``results["variants"][NAME]`` (near/far OOD means, size, speed) is declared here once.  The comparison
table (:mod:`qbdl.report.table`), the multi-run report (:mod:`qbdl.report.multi`: mean ± std over seeds,
paired claims, sweep table) and ``summarize`` (``SUMMARY_KEYS``, ``OOD_KEYS``) read it at call time.

Values are stored as in results.json (fractions, bytes); ``scale`` turns them into the displayed unit
(100: percent, 2**-20: MiB).  Nested results are named by dotted keys, as :func:`qbdl.report.multi.get_metric`
reads them: ``risk_at_coverage.<c>``, ``coverage_at_risk.<r>``, ``ood.<set>.<m>`` (``OOD_SET_METRICS``),
``ood.<set>.scores.<score>.<m>`` and ``ood_groups.<group>.<score>.<m>`` (``OOD_SCORE_METRICS``).
Pure Python: no torch, lightning or hydra.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "Better",
    "MetricSpec",
    "METRICS",
    "OOD_SET_METRICS",
    "OOD_SCORE_METRICS",
    "find_metric",
    "metric_spec",
    "summary_keys",
    "table_keys",
    "seed_keys",
    "shift_keys",
    "computed_metrics",
    "OOD_SCORES",
]

Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class MetricSpec:
    """How one metric is named, shown and compared."""

    key: str  # results key (dotted for nested results)
    label: str  # display name with its unit, e.g. "ECE %"
    better: Better | None  # direction of improvement; None: neither (e.g. mean MI)
    scale: float = 1.0  # displayed value = stored value * scale
    decimals: int = 4  # fixed decimals of the comparison table
    column: str | None = None  # comparison-table heading when shorter than the label
    # what the results hold under the key: a float, {level: float}, {OOD set: block}, {group: {score: block}}
    shape: Literal["value", "by_level", "by_set", "by_group"] = "value"
    # summarize() returns it / the experiment adds it / `compute(probs, targets)` gives it (no other code)
    source: Literal["summary", "variant", "function"] = "summary"
    table: bool = False  # a column of the comparison table (console, report.html, loggers' table)
    seeds: bool = False  # summarised over seeds and compared qbnn vs bnn in the multi-run report
    shift_row: int | None = None  # its row (order) in the data-shift table; None: not shown there
    compute: Callable[[Any, Any], float] | None = None  # source "function": f(p [S, N, C], y [N]) -> float

    @property
    def heading(self) -> str:
        """Comparison-table column heading."""
        return self.column or self.label

    def display(self, value: float) -> float:
        """The value in the displayed unit."""
        return value * self.scale

    def format(self, value: float) -> str:
        """Fixed-decimal text of the value in the displayed unit (the comparison table's format)."""
        return f"{self.display(value):.{self.decimals}f}"

    def compact(self, value: float) -> str:
        """Four significant digits in the displayed unit, whole numbers from 1000 on (the seed report's format)."""
        x = self.display(value)
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def _table(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {s.key: s for s in specs}


#: Top-level keys of one variant's results, in summarize()'s key order, then the experiment's additions.
METRICS: dict[str, MetricSpec] = _table(
    MetricSpec("accuracy", "accuracy %", "higher", 100.0, 2, table=True, seeds=True, shift_row=0),
    MetricSpec("nll", "NLL", "lower", 1.0, 4, table=True, seeds=True, shift_row=3),
    MetricSpec("brier", "Brier", "lower", 1.0, 4, seeds=True),
    MetricSpec("ece", "ECE %", "lower", 100.0, 2, table=True, seeds=True, shift_row=1),
    MetricSpec("ece_adaptive", "adaptive ECE %", "lower", 100.0, 2),
    MetricSpec("mce", "MCE %", "lower", 100.0, 2),
    MetricSpec("uce", "UCE %", "lower", 100.0, 2, table=True, seeds=True, shift_row=2),
    MetricSpec("muce", "MUCE %", "lower", 100.0, 2),
    MetricSpec("entropy_mean", "mean entropy", None, 1.0, 4),
    MetricSpec("aleatoric_mean", "mean aleatoric entropy", None, 1.0, 4),
    MetricSpec("mi_mean", "mean MI", None, 1.0, 4, table=True, seeds=True),
    MetricSpec("referral_rate_at_target", "referral %", "lower", 100.0, 1, table=True, seeds=True),
    MetricSpec("referral_auc", "referral AUC %", "higher", 100.0, 2),
    MetricSpec("aurc", "AURC %", "lower", 100.0, 3),
    MetricSpec("eaurc", "E-AURC %", "lower", 100.0, 3),
    MetricSpec("augrc", "AUGRC %", "lower", 100.0, 3, table=True, seeds=True),
    MetricSpec("risk_at_coverage", "selective risk %", "lower", 100.0, 2, shape="by_level"),
    MetricSpec("coverage_at_risk", "coverage %", "higher", 100.0, 2, shape="by_level"),
    MetricSpec("ood", "OOD detection", None, shape="by_set"),
    MetricSpec("ood_auroc", "OOD AUROC", "higher", 1.0, 3, table=True, seeds=True),
    MetricSpec("ood_groups", "OOD detection (group means)", None, shape="by_group"),
    MetricSpec("ood_near_auroc", "OOD AUROC (near)", "higher", 1.0, 3, column="near", source="variant", table=True),
    MetricSpec("ood_far_auroc", "OOD AUROC (far)", "higher", 1.0, 3, column="far", source="variant", table=True),
    MetricSpec("size_bytes", "size MiB", "lower", 1.0 / 2**20, 2, source="variant", table=True, seeds=True),
    MetricSpec("images_per_s", "img/s", "higher", 1.0, 0, source="variant", table=True, seeds=True),
    # tensors the model keeps resident (weights, noise pools, caches; qbdl.experiment.memory.resident_bytes)
    MetricSpec("resident_bytes", "memory MiB", "lower", 1.0 / 2**20, 2, column="mem MiB", source="variant", table=True, seeds=True),
    # full-network passes per image (MC samples, ensemble members; 1 for last-layer Laplace)
    MetricSpec("backbone_passes", "backbone passes / image", "lower", 1.0, 0, column="passes", source="variant", table=True),
)
#: The flat metrics of ``results["ood"][set]``: the selected score's, then the MI score's.
OOD_SET_METRICS: dict[str, MetricSpec] = _table(
    MetricSpec("auroc", "AUROC", "higher", 1.0, 3),
    MetricSpec("aupr", "AUPR-out", "higher", 1.0, 3),
    MetricSpec("fpr95", "FPR95", "lower", 1.0, 3),
    MetricSpec("auroc_mi", "AUROC (MI)", "higher", 1.0, 3),
    MetricSpec("aupr_mi", "AUPR-out (MI)", "higher", 1.0, 3),
    MetricSpec("fpr95_mi", "FPR95 (MI)", "lower", 1.0, 3),
)
#: The metrics of one OOD score (:func:`qbdl.metrics.ood.ood_metrics`), per set and per group.
OOD_SCORE_METRICS: dict[str, MetricSpec] = _table(
    MetricSpec("auroc", "AUROC", "higher", 1.0, 3),
    MetricSpec("aupr_in", "AUPR-in", "higher", 1.0, 3),
    MetricSpec("aupr_out", "AUPR-out", "higher", 1.0, 3),
    MetricSpec("fpr95", "FPR95", "lower", 1.0, 3),
)


#: The OOD scores of ``results["variants"][NAME]["ood"][SET]["scores"]``, in display order.
OOD_SCORES = ("entropy", "mi", "maxprob", "maxlogit", "energy")


def summary_keys() -> tuple[str, ...]:
    """The keys summarize() returns, in order."""
    return tuple(k for k, s in METRICS.items() if s.source == "summary")


def table_keys() -> tuple[str, ...]:
    """The comparison table's columns, in registry order."""
    return tuple(k for k, s in METRICS.items() if s.table)


def seed_keys() -> tuple[str, ...]:
    """The metrics summarised over seeds (mean ± std, QBNN vs BNN claims), in registry order."""
    return tuple(k for k, s in METRICS.items() if s.seeds)


def shift_keys() -> tuple[str, ...]:
    """The rows of the data-shift table, in their order."""
    rows = sorted((s.shift_row, k) for k, s in METRICS.items() if s.shift_row is not None)
    return tuple(k for _, k in rows)


def computed_metrics(p: Any, y: Any) -> dict[str, float]:
    """The values of the entries that carry their own function (source "function") on ``p [S, N, C]``, ``y [N]``."""
    return {k: float(s.compute(p, y)) for k, s in METRICS.items() if s.source == "function" and s.compute}


def _nested(parent: MetricSpec, key: str, rest: str) -> MetricSpec | None:
    if parent.shape == "by_level":
        try:
            level = float(rest)
        except ValueError:
            return None
        return replace(parent, key=key, label=f"{parent.label} @{100 * level:g}", shape="value")
    parts = rest.split(".")
    sub = None
    if parent.shape == "by_set" and len(parts) >= 4 and parts[-3] == "scores":  # ood.<set>.scores.<score>.<m>
        sub, where = OOD_SCORE_METRICS.get(parts[-1]), f"{'.'.join(parts[:-3])}, {parts[-2]}"
    elif parent.shape == "by_set" and len(parts) >= 2:  # ood.<set>.<m>
        sub, where = OOD_SET_METRICS.get(parts[-1]), ".".join(parts[:-1])
    elif parent.shape == "by_group" and len(parts) == 3:  # ood_groups.<group>.<score>.<m>
        sub, where = OOD_SCORE_METRICS.get(parts[2]), f"{parts[0]}, {parts[1]}"
    if sub is None:
        return None
    return replace(sub, key=key, label=f"OOD {sub.label} ({where})", source=parent.source)


def find_metric(key: str) -> MetricSpec | None:
    """The registry entry of a results key (dotted keys reach nested results); None when it has none."""
    if key in METRICS:
        return METRICS[key]
    for head, parent in METRICS.items():
        if parent.shape != "value" and key.startswith(head + "."):
            return _nested(parent, key, key[len(head) + 1 :])
    return None


def metric_spec(key: str) -> MetricSpec:
    """The registry entry of a results key; an unregistered key gets its own name, scale 1 and no direction."""
    return find_metric(key) or MetricSpec(key, key, None)
