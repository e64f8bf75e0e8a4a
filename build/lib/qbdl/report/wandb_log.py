"""W&B extras: the comparison table, plots, curves and results.json as an artifact."""

from __future__ import annotations

from pathlib import Path

from qbdl.report.table import table_rows


def log_wandb_extras(logger, results: dict, plots: dict[str, str]) -> None:
    """Log a wandb.Table of the variants and every plot as a wandb.Image."""
    import wandb

    header, rows = table_rows(results)
    run = logger.experiment
    run.log({"comparison": wandb.Table(columns=header, data=rows)})
    run.log({f"plots/{name}": wandb.Image(path) for name, path in plots.items()})


def log_results_artifact(logger, path: str | Path) -> None:
    """Attach results.json to the run as an artifact."""
    import wandb

    art = wandb.Artifact("results", type="results")
    art.add_file(str(path))
    logger.experiment.log_artifact(art)
