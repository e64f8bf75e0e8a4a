"""Hydra entry point: python -m qbdl.run [+experiment=NAME] [key=value ...].

Stages: DNN fit (or load) -> dnn_to_bnn (MOPED) -> ELBO fit -> PTQ -> evaluation -> results.json + report.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import platform
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qbdl.bayes import dnn_to_bnn
from qbdl.data.errors import BadImageError, DataLeakError, DataNotFoundError
from qbdl.io import atomic_write_json
from qbdl.lit.callbacks import EVALUATION_FILE, EvaluationCallback, PTQCallback, find_callback
from qbdl.lit.module import BayesianClassifier, NonFiniteLossError
from qbdl.machine import machine_info
from qbdl.models.resnet import WeightsUnavailableError
from qbdl.report.table import format_table
from qbdl.stages import build_ood_loaders, load_state, save_state

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


def _sync_csv_header(logger) -> None:
    """ddp_spawn fits log through a worker's copy of a CSVLogger: adopt the header that copy wrote."""
    exp = getattr(logger, "_experiment", None)
    path = getattr(exp, "metrics_file_path", None)
    if path and os.path.isfile(path):
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        exp.metrics_keys = sorted(set(exp.metrics_keys) | set(header))


def _trainer(cfg: DictConfig, stage: str, out: Path, logger, callbacks: list) -> L.Trainer:
    _sync_csv_header(logger)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out / "checkpoints" / stage,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        save_on_train_epoch_end=True,
    )
    return instantiate(
        cfg.trainer,
        max_epochs=cfg[stage].max_epochs,
        default_root_dir=str(out / stage),
        logger=logger if logger is not None else False,
        callbacks=[ckpt, *callbacks],
    )


def _resume_path(out: Path, stage: str) -> str | None:
    last = out / "checkpoints" / stage / "last.ckpt"
    return str(last) if last.exists() else None


def _fit(trainer: L.Trainer, module: L.LightningModule, dm, out: Path, stage: str) -> None:
    """trainer.fit resuming from the stage's last.ckpt (weights_only: a crafted checkpoint cannot run code)."""
    last = _resume_path(out, stage)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=last, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"refusing to resume from {last!r}: it is not loadable with torch.load(weights_only=True) "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). A checkpoint that needs "
            "arbitrary unpickling can run code; qbdl never loads one. Delete it to restart the stage."
        ) from exc


def run(cfg: DictConfig) -> dict:
    """Run one experiment; returns the results dict written to results.json."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    # The BNN stage's callbacks, built first: bad quant/eval options fail at start-up, not after training.
    callbacks = [instantiate(cfg.quant)] if cfg.get("quant") else []
    callbacks.append(instantiate(cfg.eval.callback))
    callbacks += [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]

    t0 = time.perf_counter()
    dm = instantiate(cfg.data)
    dm.setup("fit")
    if cfg.get("shift"):  # bad corruption names, severities or RGB-only corruptions fail before training
        from qbdl.data.shift import validate_shift

        validate_shift(OmegaConf.to_container(cfg.shift, resolve=True), dm)
    ood_loaders = build_ood_loaders(cfg, dm)
    atomic_write_json(out / "splits.json", dm.split_indices())
    n_train = len(dm.dataset("train"))
    timings["data"] = time.perf_counter() - t0

    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    if type(logger).__name__ == "WandbLogger" and cfg.trainer.get("strategy") is not None:
        # ddp_spawn workers attach to this W&B run and write its media under WANDB_DIR: keep them in the run dir
        os.environ["WANDB_DIR"] = str(logger.save_dir)
    if logger is not None:
        logger.log_hyperparams(_config_dict(cfg))

    # Stage 1: the deterministic network (pretrained, loaded, or fitted here).
    t0 = time.perf_counter()
    dnn = instantiate(cfg.model, num_classes=dm.num_classes, in_chans=dm.spec.in_chans)
    dnn_file = out / "dnn.safetensors"
    if cfg.dnn.checkpoint:
        load_state(dnn, cfg.dnn.checkpoint)
    elif dnn_file.exists():
        log.info("stage dnn: complete in %s, loading it", dnn_file)
        load_state(dnn, dnn_file)
    elif cfg.dnn.max_epochs > 0:
        module = BayesianClassifier(
            dnn,
            n_train,
            instantiate(cfg.dnn.optimizer),
            instantiate(cfg.dnn.scheduler),
            stage="dnn",
            seed=cfg.seed,
        )
        _fit(_trainer(cfg, "dnn", out, logger, []), module, dm, out, "dnn")
    save_state(dnn, dnn_file)
    timings["dnn"] = time.perf_counter() - t0

    # Stage 2: Bayesian network with the empirical-Bayes prior, ELBO fit, then PTQ and evaluation callbacks.
    t0 = time.perf_counter()
    bnn = dnn_to_bnn(dnn, **cfg.bayes)
    if cfg.bnn.checkpoint:
        load_state(bnn, cfg.bnn.checkpoint)
    module = BayesianClassifier(
        bnn,
        n_train,
        instantiate(cfg.bnn.optimizer),
        instantiate(cfg.bnn.scheduler),
        beta=cfg.bnn.beta,
        kl_anneal_steps=cfg.bnn.kl_anneal_steps,
        val_mc_samples=cfg.bnn.val_mc_samples,
        stage="bnn",
        seed=cfg.seed,
    )
    for cb in callbacks:
        if hasattr(cb, "attach_reference"):
            cb.attach_reference(dnn)
        if isinstance(cb, EvaluationCallback):
            cb.attach_ood(ood_loaders)
    trainer = _trainer(cfg, "bnn", out, logger, callbacks)
    (out / EVALUATION_FILE).unlink(missing_ok=True)
    _fit(trainer, module, dm, out, "bnn")
    save_state(bnn, out / "bnn.safetensors")
    timings["bnn_fit_ptq_eval"] = time.perf_counter() - t0

    ev = find_callback(callbacks, EvaluationCallback)
    ptq = find_callback(callbacks, PTQCallback)
    evaluated = {
        "variants": ev.results if ev else {},
        "plots": ev.plots if ev else {},
        "quantization_seconds": ptq.seconds if ptq else {},
        "shift": ev.shift_results if ev else {},
    }
    if ev and not ev.results and (out / EVALUATION_FILE).exists():  # ddp_spawn: rank 0 evaluated in a worker
        evaluated = {"shift": {}, **json.loads((out / EVALUATION_FILE).read_text())}
    results = {
        **evaluated,
        # model-selection metrics: validation data only (sweepers optimise these, never test metrics)
        "validation": {k: float(v) for k, v in trainer.callback_metrics.items() if "/val/" in k},
        # post-hoc temperatures of the <name>_ts variants (fitted on the validation split)
        "temperatures": {
            k: v["temperature"] for k, v in (evaluated["variants"] or {}).items() if "temperature" in v
        },
        "timings": timings,
        "data": {
            "name": type(dm).__name__,
            "n_train": n_train,
            "num_classes": dm.num_classes,
            "ood_sets": list(ood_loaders),
            "bad_files": [list(b) for b in getattr(dm, "bad_files", [])],
            "n_bad_files": len(getattr(dm, "bad_files", [])),
        },
        "config": _config_dict(cfg),
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "qbdl": _version(),
        },
        "argv": sys.argv,
    }
    atomic_write_json(out / "results.json", results)
    if results["variants"]:
        from qbdl.report.html import write_run_report

        write_run_report(results, out)
        print(format_table(results["variants"], target=cfg.eval.target_accuracy))
    if results.get("shift"):
        from qbdl.shift_eval import shift_table

        print(shift_table(results["shift"]))
    if logger is not None and type(logger).__name__ == "WandbLogger":
        from qbdl.report.wandb_log import log_results_artifact

        log_results_artifact(logger, out / "results.json")
    log.info("results in %s", out)
    return results


def _config_dict(cfg: DictConfig) -> dict:
    """The resolved run config (without the `hydra` node that the compose API adds)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def _version() -> str:
    from importlib.metadata import version

    return version("qbdl")


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
        log.error("%s: %s\n(set HYDRA_FULL_ERROR=1 for the traceback)", type(exc).__name__, exc)
        sys.exit(2)
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


def _finish_wandb(exit_code: int = 0) -> None:
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


if __name__ == "__main__":
    main()
