"""Several runs together: load run directories (results.json) and group the runs that differ only by seed."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    "shift.seed",
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


def target_accuracy(run: Run) -> float | None:
    """The run's eval.target_accuracy (None when its config has none)."""
    return ((run.results.get("config") or {}).get("eval") or {}).get("target_accuracy")


def run_overrides(run: Run) -> dict[str, str]:
    """The run's Hydra command-line overrides (.hydra/overrides.yaml) as {key: value}; empty without the file."""
    ov_file = run.path / ".hydra" / "overrides.yaml"
    if not ov_file.exists():
        return {}
    from omegaconf import OmegaConf

    items = [str(o) for o in OmegaConf.load(ov_file)]
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in items)
