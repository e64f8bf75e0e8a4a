"""The run's one results object: assembled in one place, written once as results.json (docs/data/results.schema.json)."""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from qbdl.experiment.shape import shift_parts
from qbdl.io import atomic_write_json
from qbdl.machine import machine_info

RESULTS_FILE = "results.json"
__all__ = ["RESULTS_FILE", "build_results", "data_summary", "qbdl_version", "shift_parts", "write_results"]


def qbdl_version() -> str:
    """The installed qbdl's version."""
    return version("qbdl")


def _installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def data_summary(dm: Any, ood_sets: list[str]) -> dict[str, Any]:
    """What the run evaluated on: the datamodule, its training-set size and classes, OOD sets, unreadable files."""
    bad = [list(b) for b in getattr(dm, "bad_files", [])]
    if hasattr(dm, "dataset"):
        n_train = len(dm.dataset("train"))
    else:
        n_train = len(dm.train_dataloader().dataset)
    return {
        "name": type(dm).__name__,
        "n_train": n_train,
        "num_classes": getattr(dm, "num_classes", None),
        "ood_sets": list(ood_sets),
        "bad_files": bad,
        "n_bad_files": len(bad),
    }


def build_results(
    *,
    variants: Mapping[str, Any],
    plots: Mapping[str, str],
    shift: Mapping[str, Any],
    quantization_seconds: Mapping[str, float],
    validation: Mapping[str, float],
    timings: Mapping[str, float],
    data: Mapping[str, Any],
    config: Mapping[str, Any],
    estimate: Mapping[str, Any] | None = None,
    temperatures: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """results.json's content: the evaluation, model-selection metrics, timings, data, config, machine, versions."""
    return {
        "variants": dict(variants),
        "plots": dict(plots),
        "quantization_seconds": dict(quantization_seconds),
        "shift": dict(shift),
        # model-selection metrics: validation data only (sweepers optimise these, never test metrics)
        "validation": {k: float(v) for k, v in validation.items()},
        # post-hoc temperatures of the <name>_ts variants (fitted on the validation split): stored here only
        "temperatures": {
            f"{k}_ts": float(t) for k, t in (temperatures or {}).items() if f"{k}_ts" in variants
        },
        "timings": dict(timings),
        # the start-up probe's expected seconds (qbdl.experiment.estimate), beside the actual ones
        "estimate": dict(estimate) if estimate is not None else None,
        "data": dict(data),
        "config": dict(config),
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": _installed("lightning"),
            "qbdl": qbdl_version(),
        },
        "argv": sys.argv,
    }


def write_results(results: Mapping[str, Any], out_dir: str | Path) -> Path:
    """results.json, atomically (the HTML report beside it: qbdl.report.html.write_run_report)."""
    return Path(atomic_write_json(Path(out_dir) / RESULTS_FILE, dict(results)))
