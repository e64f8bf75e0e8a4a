"""Hydra callback for multiruns: a sweep summary table when the sweep ends.

Enable with `hydra.callbacks.sweep_summary._target_=qbdl.pipeline.sweep.SweepSummary` (conf/experiment/seeds.yaml and
conf/hparams_search/optuna.yaml do). Writes SWEEP_DIR/sweep_summary.md and the multi-run report
(report.html, report.md, summary.json: mean ± std over seeds, paired claims) next to it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("qbdl")


def summarize_sweep(sweep_dir: str | Path) -> Path | None:
    """Write sweep_summary.md (+ the multi-run report) for the finished jobs under sweep_dir."""
    from qbdl.io import atomic_write_bytes
    from qbdl.report import multi

    sweep_dir = Path(sweep_dir)
    try:
        runs = multi.load_runs([sweep_dir])
    except FileNotFoundError as exc:
        log.warning("sweep summary: %s", exc)
        return None
    best = None
    opt = sweep_dir / "optimization_results.yaml"  # written by the Optuna sweeper
    if opt.exists():
        best = OmegaConf.to_container(OmegaConf.load(opt), resolve=True)
    text = multi.sweep_markdown(runs, best)
    path = atomic_write_bytes(sweep_dir / "sweep_summary.md", text.encode())
    multi.write_report(runs, sweep_dir)
    log.info("sweep summary (%d jobs) in %s\n%s", len(runs), path, text)
    return path


class SweepSummary(Callback):
    """At the end of a multirun, tabulate every job's results (and the Optuna best point)."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.job_dirs: list[Path] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra hook: remember the sweep dir as resolved when the sweep starts (it may use ${now:...})."""
        self.sweep_dir = Path(config.hydra.sweep.dir)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Hydra hook (jobs in this process only): remember where the job wrote its output."""
        self.job_dirs.append(Path(config.hydra.runtime.output_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra hook: runs once after the last job."""
        sweep_dir = self.sweep_dir or Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir() and self.job_dirs:
            sweep_dir = self.job_dirs[0].parent
        summarize_sweep(sweep_dir)
