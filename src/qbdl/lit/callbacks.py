"""Lightning adapters of qbdl's stages: post-training quantization, then evaluation, after any BNN fit.

Both work in any Trainer whose LightningModule holds a Bayesian network (from qbdl.bayes.dnn_to_bnn) as
`.model` (or is one) and whose LightningDataModule has test_dataloader() (val_dataloader() for the `_ts`
variants). The evaluation writes results.json, predictions, plots and report.html to `out_dir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from qbdl import quant
from qbdl.bayes.layers import BayesianLayer
from qbdl.experiment.evaluate import Variant, evaluate_variants, model_variants, save_predictions
from qbdl.experiment.quantize import Quantized, calibration_batches, load_quantized, quantize_to_file
from qbdl.experiment.results import RESULTS_FILE, build_results, data_summary, write_results
from qbdl.experiment.shard import Shard, cpu_threads_per_rank, current_shard, destroy_group_at_exit
from qbdl.experiment.stages import build_ood_loaders
from qbdl.report.loggers import log_results

log = logging.getLogger(__name__)


def bayesian_model(pl_module: L.LightningModule) -> nn.Module:
    """The Bayesian network a LightningModule holds: its `.model`, else the module itself."""
    model = getattr(pl_module, "model", pl_module)
    if not isinstance(model, nn.Module) or not any(isinstance(m, BayesianLayer) for m in model.modules()):
        raise ValueError(
            f"{type(pl_module).__name__} holds no Bayesian network: qbdl's callbacks quantize and evaluate "
            "the BNN at `pl_module.model` (or the module itself). Convert the network with "
            "qbdl.bayes.dnn_to_bnn(net) and keep it as self.model."
        )
    return model


def write_run_outputs(results: dict, out_dir: Path) -> Path:
    """results.json and, when variants were evaluated, report.html beside it; returns results.json's path."""
    from qbdl.report.html import write_run_report

    path = write_results(results, out_dir)
    if results["variants"]:
        write_run_report(results, out_dir)
    return path


class PTQCallback(L.Callback):
    """After fit: calibrate on training batches and convert the BNN (qbnn) and, given one, the DNN (qdnn).

    `options` are quant.quantize_bnn's (backend, sampler, bank_size, calib_batches, mc_samples, observer, seed,
    fresh_kernel, noise_slots); the models are saved as `out_dir`/<name>.qbdl and reused by a resumed run
    when made from the same weights, calibration batches and options.
    """

    def __init__(
        self,
        out_dir: str,
        calib_batch_size: int | None = None,
        quantize_dnn: bool = True,
        reference: nn.Module | None = None,
        **options: Any,
    ) -> None:
        quant.check_options(**options)  # fail at start-up, not after hours of training
        self.options = dict(options)
        self.calib_batch_size = calib_batch_size
        self.quantize_dnn = quantize_dnn
        self.reference = reference  # the stage-1 DNN (qdnn when quantize_dnn)
        self.out_dir = Path(out_dir)
        self.quantized: dict[str, Quantized] = {}

    def settings(self) -> dict[str, Any]:
        """The options this callback quantizes with (results.json's config.quant outside qbdl.run)."""
        return {**self.options, "calib_batch_size": self.calib_batch_size, "quantize_dnn": self.quantize_dnn}

    def quantize(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Quantized]:
        """Run PTQ once (calibration reads training images only, never test data); later calls return it.

        Under DDP every rank calls this: rank 0 calibrates, converts and saves, the others load its files.
        """
        if not self.quantized:
            shard = current_shard()
            models = {"qbnn": bayesian_model(pl_module)}
            if self.quantize_dnn and self.reference is not None:
                models["qdnn"] = self.reference
            if shard.is_main:
                calib = calibration_batches(
                    trainer.datamodule, self.calib_batch_size, self.options.get("calib_batches")
                )
                for name, model in models.items():
                    path = self.out_dir / f"{name}.qbdl"
                    self.quantized[name] = quantize_to_file(name, model, calib, self.options, path)
            shard.barrier()
            if not shard.is_main:
                self.quantized = {n: load_quantized(self.out_dir / f"{n}.qbdl") for n in models}
        return self.quantized

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        destroy_group_at_exit()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.quantize(trainer, pl_module)


class EvaluationCallback(L.Callback):
    """After fit (and PTQ): evaluate the variants on the test and OOD sets with the same MC seeds.

    Writes `out_dir`/results.json, predictions.npz, plots/ and report.html, and logs the numbers to the
    Trainer's loggers. Variants: bnn, bnn_mean, dnn (with `reference`), qbnn/qdnn (with a PTQCallback),
    each also as <name>_ts (temperature-scaled on the validation split); `variants=None` evaluates all
    that the run has. OOD sets: `ood_loaders` ({name: DataLoader}, transformed like the test data), the
    datamodule's built-in sets named in `builtin_ood`, and `ood` ({name: {datamodule, n, seed, split}}).
    """

    def __init__(
        self,
        out_dir: str,
        variants: Sequence[str] | None = None,
        mc_samples: int = 8,
        seed: int = 0,
        target_accuracy: float = 0.995,
        n_bins: int = 15,
        score: str = "entropy",
        batch_size: int = 256,
        builtin_ood: Sequence[str] = (),
        ood: Mapping[str, Mapping[str, Any]] | None = None,
        ood_groups: Mapping[str, str] | None = None,
        equivalence: Mapping[str, float] | None = None,
        shift: Mapping[str, Any] | None = None,
        reference: nn.Module | None = None,
        ood_loaders: Mapping[str, Any] | None = None,
        run_info: Mapping[str, Any] | None = None,
    ) -> None:
        bad = {k: g for k, g in (ood_groups or {}).items() if g not in ("near", "far")}
        if bad:
            raise ValueError(f"eval.ood_groups: each OOD set is 'near' or 'far', got {bad}")
        self.variant_names = None if variants is None else list(variants)
        self.mc_samples = mc_samples
        self.seed = seed
        self.target_accuracy = target_accuracy
        self.n_bins = n_bins
        self.score = score
        self.batch_size = batch_size
        self.builtin_ood = list(builtin_ood)
        self.ood = dict(ood or {})
        self.ood_groups = dict(ood_groups or {})
        self.equivalence = dict(equivalence or {})
        self.shift = dict(shift or {})  # conf/shift: corruptions x severities of the test split
        self.reference = reference  # the stage-1 DNN (variant 'dnn')
        self.user_ood = dict(ood_loaders or {})
        # qbdl.run's config and earlier stages' timings; outside qbdl.run, the callbacks' own settings
        self.run_info = dict(run_info or {})
        self.out_dir = Path(out_dir)
        self._ood_loaders: dict | None = None
        self.results: dict = {}

    def settings(self) -> dict[str, Any]:
        """What this callback evaluates with (results.json's config.eval outside qbdl.run)."""
        keys = ("variant_names", "mc_samples", "seed", "target_accuracy", "n_bins", "score", "batch_size")
        out = {k.removesuffix("_names"): getattr(self, k) for k in keys}
        return out | {
            "builtin_ood": self.builtin_ood,
            "ood_groups": self.ood_groups,
            "equivalence": self.equivalence,
            "ood": sorted(self.ood_loaders_cached()),
        }

    def ood_loaders_for(self, dm: Any) -> dict:
        """The OOD loaders on `dm`'s transforms, built once; bad names and leaks into the test set fail here."""
        if self._ood_loaders is None:
            built = {}
            if self.builtin_ood or self.ood:
                built = build_ood_loaders(dm, self.builtin_ood, self.ood, self.batch_size)
            self._ood_loaders = {**built, **self.user_ood}
        return self._ood_loaders

    def ood_loaders_cached(self) -> dict:
        """The OOD loaders once built (or the user's, before)."""
        return self._ood_loaders if self._ood_loaders is not None else self.user_ood

    def _variants(
        self, pl_module: L.LightningModule, quantized: Mapping[str, Quantized]
    ) -> tuple[list[Variant], list[str]]:
        """The models to evaluate and the requested names (with their `_ts` twins)."""
        available = model_variants(
            bayesian_model(pl_module),
            self.mc_samples,
            str(pl_module.device),
            reference=self.reference,
            quantized={n: (q.model, q.size_bytes) for n, q in quantized.items()},
        )
        names = self.variant_names if self.variant_names is not None else list(available)
        missing = [n for n in names if n.removesuffix("_ts") not in available]
        if missing:
            raise ValueError(
                f"eval.variants asks for {missing}, which this run does not produce (it has {sorted(available)}, "
                "each also temperature-scaled as <name>_ts). 'dnn' needs the DNN stage, 'qbnn'/'qdnn' the quant "
                "callback (quant.quantize_dnn for qdnn)."
            )
        return [available[n] for n in dict.fromkeys(n.removesuffix("_ts") for n in names)], names

    def data_key(self, dm: Any) -> str:
        """The test and OOD data a prediction is made on: datamodule, its settings and splits, the OOD sets."""
        parts = {
            "datamodule": type(dm).__name__,
            "spec": repr(getattr(dm, "spec", None)),
            "splits": dm.split_indices() if hasattr(dm, "split_indices") else None,
            "ood": {k: len(getattr(v, "dataset", ())) for k, v in self.ood_loaders_cached().items()},
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        destroy_group_at_exit()  # in every DDP worker, whoever's Trainer and module it is

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_end = time.perf_counter()  # before any on_fit_end (PTQ runs there)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank evaluates its share of each set; rank 0 gathers, computes the metrics and writes.
        shard = current_shard()
        threads = torch.get_num_threads()
        if shard.world > 1:  # one process per rank on this machine's cores, not each on all of them
            cap = self.run_info.get("threads") or threads  # qbdl.run's `threads`, else this process's
            torch.set_num_threads(min(cap, cpu_threads_per_rank(trainer.num_devices)))
        try:
            self._evaluate(trainer, pl_module, shard)
        finally:
            torch.set_num_threads(threads)

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, shard: Shard) -> None:
        now = time.perf_counter()
        fit_seconds = getattr(self, "_fit_end", now) - getattr(self, "_fit_start", now)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "test_dataloader"):
            raise ValueError(
                "EvaluationCallback needs the test set: pass a LightningDataModule with test_dataloader() "
                "to trainer.fit(module, datamodule=dm)"
            )
        ood_loaders = self.ood_loaders_for(dm)
        ptq = [cb for cb in trainer.callbacks if isinstance(cb, PTQCallback)]
        # PTQ first, whatever the callbacks' order (each runs once: later calls return its models)
        quantized = {n: q for cb in ptq for n, q in cb.quantize(trainer, pl_module).items()}
        variants, names = self._variants(pl_module, quantized)
        ts = [n.removesuffix("_ts") for n in names if n.endswith("_ts")]
        data_key = self.data_key(dm)
        t0 = time.perf_counter()
        ev = evaluate_variants(
            variants,
            dm.test_dataloader(),
            ood_loaders,
            seed=self.seed,
            target_accuracy=self.target_accuracy,
            n_bins=self.n_bins,
            score=self.score,
            cache_dir=self.out_dir / "eval_cache",
            data_key=data_key,
            temperature_scaled=ts,
            val_loader=dm.val_dataloader() if ts else None,
            ood_groups=self.ood_groups,
            shard=shard,
        )
        shift = {}
        if self.shift.get("corruptions"):  # every rank: its share of the corrupted sets too
            from qbdl.experiment.shift import evaluate_shift_stage

            shift = evaluate_shift_stage(
                dm, variants, self.shift, ev, seed=self.seed, n_bins=self.n_bins,
                out_dir=self.out_dir, data_key=data_key, shard=shard,
            )  # fmt: skip
        if not shard.is_main:
            return
        from qbdl.report.figures import save_plots
        from qbdl.report.shift_plots import save_shift_plots

        save_predictions(ev.predictions, self.out_dir / "predictions.npz")
        plots = save_plots(ev.curves, self.out_dir / "plots", self.target_accuracy)
        if shift:
            from qbdl.report.shift import shift_table

            plots |= save_shift_plots(shift, self.out_dir / "plots", clean=ev.metrics)
            log.info("data shift (mean over corruptions):\n%s", shift_table(shift))
        eval_seconds = time.perf_counter() - t0
        ptq_seconds = {n: q.seconds for n, q in quantized.items() if q.seconds is not None}
        config = self.run_info.get("config") or {
            "eval": self.settings(),
            **({"quant": ptq[0].settings()} if ptq else {}),
        }
        self.results = build_results(
            variants=ev.metrics,
            plots=plots,
            shift=shift,
            quantization_seconds=ptq_seconds,
            validation={k: v for k, v in trainer.callback_metrics.items() if "/val/" in k},
            timings={
                **self.run_info.get("timings", {}),
                "bnn_fit": fit_seconds,
                "ptq": sum(ptq_seconds.values()),  # 0 when the saved models were reused
                "evaluation": eval_seconds,
                "evaluation_ranks": shard.world,  # processes that shared the evaluation
            },
            data=data_summary(dm, list(ood_loaders)),
            config=config,
            estimate=self.run_info.get("estimate"),
            temperatures=ev.temperatures,
        )
        path = write_run_outputs(self.results, self.out_dir)
        log_results(trainer.loggers, self.results, trainer.global_step, path)
        log.info("results in %s", self.out_dir / RESULTS_FILE)
