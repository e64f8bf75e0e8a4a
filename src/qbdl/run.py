"""Hydra entry point: python -m qbdl.run [+experiment=NAME] [key=value ...].

Runs qbdl.pipeline.run.run on the composed config; bad input or configuration ends in one clear
paragraph (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig
from torch.multiprocessing import ProcessExitedException

from qbdl.data.errors import BadImageError, DataLeakError, DataNotFoundError
from qbdl.lit.module import NonFiniteLossError
from qbdl.models.resnet import WeightsUnavailableError
from qbdl.pipeline.run import run

log = logging.getLogger("qbdl")
# Errors that describe bad input or configuration (their messages say what to fix).
USER_ERRORS = (
    DataNotFoundError,
    WeightsUnavailableError,
    BadImageError,
    DataLeakError,
    FileNotFoundError,
    NonFiniteLossError,
    ValueError,
)
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # inside the package: wheels carry it


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns cfg.optimize_metric's value for sweepers."""
    exit_code = 1  # recorded in the W&B run when run() raises
    try:
        results = run(cfg)
        exit_code = 0
    except (*USER_ERRORS, InstantiationException) as exc:
        # Hydra wraps errors of constructors (model weights, data, quant options): unwrap user errors.
        if isinstance(exc, InstantiationException):
            if not isinstance(exc.__cause__, USER_ERRORS):
                raise
            exc = exc.__cause__
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise exc
        # A problem with the input or the configuration: one clear paragraph, no traceback.
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 for the traceback)", type(exc).__name__, _paragraph(exc))
        sys.exit(2)
    except (
        ProcessExitedException
    ) as exc:  # a DDP worker died (killed, out of memory): no Python error to show
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error(
            "a DDP worker process died (%s). Nothing partial was written: results.json only ever comes from a "
            "complete evaluation. Run the same command again to resume: finished stages (dnn.safetensors, "
            "checkpoints/), the quantized models and every completely evaluated variant (eval_cache/) are reused.",
            exc,
        )
        sys.exit(3)
    finally:
        _finish_wandb(exit_code)
    metric = cfg.get("optimize_metric")
    if metric:
        if metric not in results["validation"]:
            raise ValueError(
                f"optimize_metric {metric!r} is not a validation metric of this run; it has "
                f"{sorted(results['validation'])}. Sweeps select on validation data, never on the test set."
            )
        return results["validation"][metric]
    return None


def _paragraph(exc: BaseException) -> str:
    """The error's own message: a DataLoader worker's re-raise wraps it in the worker's traceback text."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if last.startswith(type(exc).__name__) and ": " in last else last
    return text


def _finish_wandb(exit_code: int = 0) -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


if __name__ == "__main__":
    main()
