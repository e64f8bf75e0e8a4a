"""The experiment pipeline (Hydra + Lightning, above qbdl.experiment): DNN fit (or load) -> dnn_to_bnn (MOPED) -> ELBO fit -> PTQ -> evaluation.

`run(cfg)` takes a composed Hydra config (conf/config.yaml); `python -m qbdl.run` is its command line.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qbdl.bayes import dnn_to_bnn
from qbdl.experiment.results import RESULTS_FILE
from qbdl.io import atomic_write_json
from qbdl.lit.module import BayesianClassifier
from qbdl.models.files import load_state, save_state
from qbdl.pipeline.build import build_run
from qbdl.report.shift import shift_table
from qbdl.report.table import format_table

log = logging.getLogger("qbdl")


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
    """Run one experiment; returns the results dict that the evaluation callback wrote to results.json."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    t0 = time.perf_counter()
    parts = build_run(cfg)
    dm, dnn, evaluation, callbacks = parts.dm, parts.dnn, parts.evaluation, parts.callbacks
    atomic_write_json(out / "splits.json", dm.split_indices())
    n_train = len(dm.dataset("train"))
    timings["data"] = time.perf_counter() - t0
    estimate = None
    if cfg.estimate:  # the cost before paying it; the probe leaves the RNG streams of the run untouched
        from qbdl.experiment.estimate import estimate_for_config, format_estimate

        with torch.random.fork_rng(devices=[]):
            estimate = estimate_for_config(cfg, dm, dnn, evaluation.ood_loaders_cached())
        log.info("%s", format_estimate(estimate))

    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    if type(logger).__name__ == "WandbLogger" and cfg.trainer.get("strategy") is not None:
        # ddp_spawn workers attach to this W&B run and write its media under WANDB_DIR: keep them in the run dir
        os.environ["WANDB_DIR"] = str(logger.save_dir)
    if logger is not None:
        logger.log_hyperparams(_config_dict(cfg))

    # Stage 1: the deterministic network (pretrained, loaded, or fitted here).
    t0 = time.perf_counter()
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

    # Stage 2: Bayesian network with the empirical-Bayes prior, ELBO fit, then the PTQ and evaluation callbacks.
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
    evaluation.run_info = {
        "config": _config_dict(cfg),
        "timings": dict(timings),
        "threads": cfg.threads,
        "estimate": estimate,
    }
    trainer = _trainer(cfg, "bnn", out, logger, callbacks)
    (out / RESULTS_FILE).unlink(missing_ok=True)  # never read back a results.json of an earlier attempt
    _fit(trainer, module, dm, out, "bnn")
    save_state(bnn, out / "bnn.safetensors")

    # Under ddp_spawn rank 0 evaluated in a worker process: its results.json is the record.
    results = evaluation.results or json.loads((out / RESULTS_FILE).read_text())
    if results["variants"]:
        print(format_table(results["variants"], target=cfg.eval.target_accuracy))
    if results.get("shift"):
        print(shift_table(results["shift"]))
    log.info("results in %s", out)
    return results


def _config_dict(cfg: DictConfig) -> dict:
    """The resolved run config (without the `hydra` node that the compose API adds)."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
