"""Callbacks run after the BNN fit: post-training quantization, then uncertainty evaluation."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import lightning as L
from torch import nn
from tqdm.auto import tqdm

from qbdl import quant
from qbdl.bayes import sampling
from qbdl.evaluation import (
    Variant,
    evaluate_variants,
    model_fingerprint,
    save_plots,
    save_predictions,
    state_dict_bytes,
    tensors_fingerprint,
)
from qbdl.io import atomic_write_json

log = logging.getLogger(__name__)
EVALUATION_FILE = "evaluation.json"  # the evaluation callback's results, written by rank 0


def find_callback(callbacks: list, cls: type):
    """The first callback of type `cls`, or None."""
    return next((c for c in callbacks if isinstance(c, cls)), None)


class MeanWeights(nn.Module):
    """The BNN run on its posterior-mean weights: the control for 'Bayesian averaging vs extra training'."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        with sampling(self.model, "mean"):
            return self.model(x)


class PTQCallback(L.Callback):
    """After fit: prepare -> calibrate on training batches -> convert, for the BNN (qbnn) and the DNN (qdnn)."""

    def __init__(
        self,
        backend: str,
        mode: str,
        bank_size: int,
        fresh_kernel: str,
        noise_slots: int,
        calib_batches: int,
        calib_batch_size: int | None,
        mc_samples: int,
        observer: str,
        seed: int,
        quantize_dnn: bool,
        out_dir: str,
    ) -> None:
        # Fail at start-up, not after hours of training: the options are only used once the fit ends.
        quant.check_backend(backend)
        for name, value, allowed in (
            ("mode", mode, quant.SAMPLINGS),
            ("fresh_kernel", fresh_kernel, quant.FRESH_KERNELS),
            ("observer", observer, quant.OBSERVERS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown quant.{name} {value!r}; choose one of {list(allowed)}")
        if calib_batches is not None and calib_batches < 1:
            raise ValueError(
                f"quant.calib_batches must be >= 1, got {calib_batches} (calibration needs data)"
            )
        self.cfg = dict(
            backend=backend,
            mode=mode,
            bank_size=bank_size,
            fresh_kernel=fresh_kernel,
            noise_slots=noise_slots,
            calib_batches=calib_batches,
            mc_samples=mc_samples,
            observer=observer,
            seed=seed,
        )
        self.calib_batch_size = calib_batch_size
        self.quantize_dnn = quantize_dnn
        self.out_dir = Path(out_dir)
        self.models: dict[str, nn.Module] = {}
        self.reference: nn.Module | None = None
        self.seconds: dict[str, float] = {}

    def attach_reference(self, dnn: nn.Module) -> None:
        """The stage-1 DNN, quantized too (qdnn) when quantize_dnn is set."""
        self.reference = dnn

    def fingerprint(self, model: nn.Module, calib: list) -> str:
        """What determines a quantized model: the options, the weights and the calibration batches."""
        h = hashlib.sha256(json.dumps(self.cfg, sort_keys=True).encode())
        h.update(model_fingerprint(model).encode())
        h.update(tensors_fingerprint(b[0] if isinstance(b, (tuple, list)) else b for b in calib).encode())
        return h.hexdigest()

    def _quantize(self, name: str, model: nn.Module, calib: list) -> None:
        path = self.out_dir / f"{name}.qbdl"
        fp = self.fingerprint(model, calib)
        if path.exists():  # a resumed run: reused only if made from the same weights, batches and options
            loaded = quant.load_qbnn(path)
            if loaded.qbdl_meta.get("fingerprint") == fp:
                log.info("loading %s from %s (already quantized)", name, path)
                self.models[name] = loaded
                return
            log.info("%s: %s was made with other options, weights or data; quantizing again", name, path)
        t0 = time.perf_counter()
        cpu_model = copy.deepcopy(model).cpu().eval()
        batches = tqdm(calib, desc=f"calibrate {name}", leave=False, dynamic_ncols=True)
        q = quant.quantize_bnn(cpu_model, batches, **self.cfg)
        q.qbdl_meta = {**getattr(q, "qbdl_meta", {}), "fingerprint": fp}
        self.models[name] = q
        self.seconds[name] = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        quant.save_qbnn(self.models[name], path)

    def calibration_batches(self, trainer: L.Trainer) -> list:
        """The calibration batches, drawn once: qbnn and qdnn are calibrated on the same images."""
        loader = trainer.datamodule.calib_dataloader(self.calib_batch_size)
        n = self.cfg["calib_batches"]
        return list(loader if n is None else itertools.islice(loader, n))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        # Calibration reads training images only (DESIGN: never test data).
        calib = self.calibration_batches(trainer)
        self._quantize("qbnn", pl_module.model, calib)
        if self.quantize_dnn and self.reference is not None:
            self._quantize("qdnn", self.reference, calib)


class EvaluationCallback(L.Callback):
    """After fit (and PTQ): evaluate dnn, bnn, bnn_mean, qbnn, qdnn on the test and OOD sets with the same seeds."""

    def __init__(
        self,
        variants: list[str],
        mc_samples: int,
        seed: int,
        target_accuracy: float,
        n_bins: int,
        score: str,
        out_dir: str,
        ood_groups: dict[str, str] | None = None,
        shift: dict | None = None,
    ) -> None:
        bad = {k: g for k, g in (ood_groups or {}).items() if g not in ("near", "far")}
        if bad:
            raise ValueError(f"eval.ood_groups: each OOD set is 'near' or 'far', got {bad}")
        self.ood_groups = dict(ood_groups or {})
        self.shift = dict(shift or {})  # conf/shift: corruptions x severities of the test split
        self.shift_results: dict = {}
        self.variant_names = list(variants)
        self.mc_samples = mc_samples
        self.seed = seed
        self.target_accuracy = target_accuracy
        self.n_bins = n_bins
        self.score = score
        self.out_dir = Path(out_dir)
        self.reference: nn.Module | None = None
        self.ood_loaders: dict = {}
        self.results: dict = {}
        self.plots: dict[str, str] = {}

    def attach_reference(self, dnn: nn.Module) -> None:
        """The stage-1 DNN (variant 'dnn')."""
        self.reference = dnn

    def attach_ood(self, loaders: dict) -> None:
        """OOD loaders {name: DataLoader}, transformed like the in-distribution data."""
        self.ood_loaders = dict(loaders)

    def _variants(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Variant]:
        ptq = find_callback(trainer.callbacks, PTQCallback)
        quantized = ptq.models if ptq else {}
        bnn = pl_module.model.eval()
        device = str(pl_module.device)
        available: dict[str, Variant] = {
            "bnn": Variant("bnn", bnn, self.mc_samples, state_dict_bytes(bnn), device),
            "bnn_mean": Variant("bnn_mean", MeanWeights(bnn), 1, state_dict_bytes(bnn), device),
        }
        if self.reference is not None:
            ref = self.reference.eval()
            available["dnn"] = Variant("dnn", ref, 1, state_dict_bytes(ref), device)
        for name, model in quantized.items():
            size = (ptq.out_dir / f"{name}.qbdl").stat().st_size
            available[name] = Variant(name, model, self.mc_samples if name == "qbnn" else 1, size, "cpu")
        missing = [n for n in self.variant_names if n.removesuffix("_ts") not in available]
        if missing:
            raise ValueError(
                f"eval.variants asks for {missing}, which this run does not produce (it has {sorted(available)}, "
                "each also temperature-scaled as <name>_ts). 'dnn' needs the DNN stage, 'qbnn'/'qdnn' the quant "
                "callback (quant.quantize_dnn for qdnn)."
            )
        bases = dict.fromkeys(n.removesuffix("_ts") for n in self.variant_names)
        return [available[n] for n in bases]

    def data_key(self, dm) -> str:
        """The test and OOD data a prediction is made on: datamodule, its settings and splits, the OOD sets."""
        parts = {
            "datamodule": type(dm).__name__,
            "spec": repr(getattr(dm, "spec", None)),
            "splits": dm.split_indices() if hasattr(dm, "split_indices") else None,
            "ood": {k: len(getattr(v, "dataset", ())) for k, v in self.ood_loaders.items()},
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        test_loader = dm.test_dataloader()
        ts = [n.removesuffix("_ts") for n in self.variant_names if n.endswith("_ts")]
        variants = self._variants(trainer, pl_module)
        data_key = self.data_key(dm)
        clean_logits: dict = {}
        results, predictions, curves = evaluate_variants(
            variants,
            test_loader,
            self.ood_loaders,
            seed=self.seed,
            target_accuracy=self.target_accuracy,
            n_bins=self.n_bins,
            score=self.score,
            cache_dir=self.out_dir / "eval_cache",
            data_key=data_key,
            temperature_scaled=ts,
            val_loader=dm.val_dataloader() if ts else None,
            ood_groups=self.ood_groups,
            test_logits=clean_logits,
        )
        self.results = results
        save_predictions(predictions, self.out_dir / "predictions.npz")
        self.plots = save_plots(curves, self.out_dir / "plots", self.target_accuracy)
        # Under ddp_spawn this runs in the rank-0 worker: run() in the main process reads this file back.
        ptq = find_callback(trainer.callbacks, PTQCallback)
        state = {"variants": results, "plots": self.plots, "quantization_seconds": ptq.seconds if ptq else {}}
        if self.shift.get("corruptions"):
            self.shift_results = self._evaluate_shift(dm, variants, clean_logits, results, data_key)
            state["shift"] = self.shift_results
        atomic_write_json(self.out_dir / EVALUATION_FILE, state)
        log_to_logger(trainer, results, self.plots, self.shift_results)

    def _evaluate_shift(
        self, dm, variants: list[Variant], clean_logits: dict, results: dict, data_key: str
    ) -> dict:
        """Every variant on the corrupted test sets (conf/shift), with the clean evaluation's MC seeds."""
        from qbdl.data.shift import shift_datasets
        from qbdl.shift_eval import evaluate_shift, save_shift_plots, shift_table

        sets = shift_datasets(dm, self.shift, cache_dir=self.out_dir / "shift_cache")
        shift = evaluate_shift(
            variants,
            sets,
            seed=self.seed,
            batch_size=dm.eval_batch_size,
            n_bins=self.n_bins,
            clean_logits=clean_logits,
            cache_dir=self.out_dir / "eval_cache" / "shift",
            data_key=data_key,
            baseline="dnn",
            clean=results,
            temperatures={
                n.removesuffix("_ts"): r["temperature"] for n, r in results.items() if "temperature" in r
            },
        )
        self.plots |= save_shift_plots(shift, self.out_dir / "plots", clean=results)
        log.info("data shift (mean over corruptions):\n%s", shift_table(shift))
        return shift


def _numeric_leaves(d: dict, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _numeric_leaves(v, f"{prefix}/{k}")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = v
    return out


def log_to_logger(
    trainer: L.Trainer, results: dict, plots: dict[str, str], shift: dict | None = None
) -> None:
    """Every numeric result as '<variant>/<key>[/<subkey>...]' (and 'shift/...'), plus tables and images."""
    flat: dict[str, float] = {}
    for v, res in results.items():
        flat |= _numeric_leaves(res, v)
    flat |= _numeric_leaves({k: val for k, val in (shift or {}).items() if k != "_meta"}, "shift")
    for logger in trainer.loggers:
        logger.log_metrics(flat, step=trainer.global_step)
        if type(logger).__name__ == "WandbLogger":
            from qbdl.report.wandb_log import log_wandb_extras

            log_wandb_extras(logger, results, plots)
