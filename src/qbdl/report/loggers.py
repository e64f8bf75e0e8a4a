"""The results of a run, sent to the Trainer's loggers: flat metrics, and for W&B tables, images and an artifact."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qbdl.experiment.shape import shift_parts


def numeric_leaves(d: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Every int/float leaf of a nested dict as {'<prefix>/<key>/<subkey>...': value} (bools left out)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= numeric_leaves(v, f"{prefix}/{k}")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = v
    return out


def log_results(loggers: Iterable[Any], results: Mapping[str, Any], step: int, path: str | Path) -> None:
    """Each variant's numbers as '<variant>/<key>[/...]' and the shift results as 'shift/...' to every logger.

    Shift: cells as 'shift/<variant>/<corruption>/<severity>/<metric>', 'shift/summary/...', 'shift/mce/...'.

    A WandbLogger also gets the comparison table, the plots and results.json (`path`) as an artifact.
    """
    flat: dict[str, float] = {}
    for v, res in results["variants"].items():
        flat |= numeric_leaves(res, v)
    shift = shift_parts(results.get("shift") or {})
    flat |= numeric_leaves(shift["cells"], "shift")
    flat |= numeric_leaves(shift["summary"], "shift/summary") | numeric_leaves(shift["mce"], "shift/mce")
    for logger in loggers:
        logger.log_metrics(flat, step=step)
        if type(logger).__name__ == "WandbLogger":
            from qbdl.report.wandb_log import log_results_artifact, log_wandb_extras

            log_wandb_extras(logger, results["variants"], results["plots"])
            log_results_artifact(logger, path)
