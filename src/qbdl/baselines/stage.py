"""The baselines inside an experiment: train/load, quantize and evaluate ens/qens, mcd/qmcd, lla/qlla.

`BaselinesEvaluation` is qbdl's EvaluationCallback plus these variants: set it as `eval._target_` (as
conf/experiment/digits_baselines.yaml does) and the run evaluates them with the same MC seeds, metrics, OOD
sets, shift sets and `_ts` temperature scaling as dnn/bnn/qbnn. Their settings come from the run's config
(top-level groups `ensemble`, `mcd`, `lla`; the DNN recipe `dnn`, `model`, `trainer`): qbdl.run hands the
resolved config to the callback (run_info['config']) before any training. INT8 twins go through the run's
PTQ callback (same options, same calibration batches). Everything trained or quantized here is saved under
`<out_dir>/baselines` and `<quant.out_dir>` and reused by a resumed run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from torch import nn

from qbdl.baselines.ensemble import Ensemble
from qbdl.baselines.laplace import fit_last_layer_laplace
from qbdl.baselines.mcdropout import add_mc_dropout, for_ptq, to_int8_dropout
from qbdl.experiment.evaluate import Variant
from qbdl.experiment.quantize import calibration_batches, quantize_to_file
from qbdl.lit.callbacks import EvaluationCallback, PTQCallback, write_run_outputs
from qbdl.lit.module import BayesianClassifier
from qbdl.models.files import load_state, save_state, state_dict_bytes

log = logging.getLogger(__name__)

BASELINES = ("ens", "qens", "mcd", "qmcd", "lla", "qlla")


def _need(config: Mapping[str, Any], key: str, names: list[str]) -> Mapping[str, Any]:
    """The `key` settings of the run config, or a clear error naming the group to add."""
    if key not in config or config[key] is None:
        raise ValueError(
            f"eval.variants asks for {names}, which need the `{key}` settings (conf/{key}/default.yaml): add "
            f"`- {key}: default` to the experiment's defaults (as conf/experiment/digits_baselines.yaml does)"
        )
    return config[key]


def _member_loader(dm: Any, seed: int):
    """The datamodule's training loader, shuffled by a generator of its own seed (each member its own order)."""
    loader = dm.train_dataloader()
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        sampler.generator = torch.Generator().manual_seed(seed)
    return loader


def train_dnn_recipe(config: Mapping[str, Any], dm: Any, seed: int, out: Path, transform=None) -> nn.Module:
    """A fresh `model` from seed `seed`, fitted with the DNN recipe (dnn.optimizer/scheduler/max_epochs, trainer).

    transform(model) edits the architecture before training (e.g. MC dropout). Saved to `out`; a saved file
    is loaded instead (resumed run).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate(config["model"], num_classes=dm.num_classes, in_chans=dm.spec.in_chans)
        if transform is not None:
            model = transform(model)
        if out.exists():
            log.info("baseline %s: loading %s", out.stem, out)
            return load_state(model, out).eval()
        dnn = config["dnn"]
        if dnn.get("max_epochs", 0) > 0:
            module = BayesianClassifier(
                model, len(dm.dataset("train")), instantiate(dnn["optimizer"]),
                instantiate(dnn["scheduler"]) if dnn.get("scheduler") else None, stage=out.stem, seed=seed,
            )  # fmt: skip
            # no progress bar: this fit runs inside the outer fit's on_fit_end, and two Rich live displays on one
            # console end in rich's IndexError when the outer one stops
            trainer = instantiate(
                config["trainer"], max_epochs=dnn["max_epochs"], logger=False, enable_checkpointing=False,
                callbacks=[], limit_val_batches=0, default_root_dir=str(out.parent / out.stem),
                enable_progress_bar=False,
            )  # fmt: skip
            trainer.fit(module, train_dataloaders=_member_loader(dm, seed))
    save_state(model, out)
    return model.eval()


class BaselinesEvaluation(EvaluationCallback):
    """EvaluationCallback that also evaluates deep ensembles, MC dropout and last-layer Laplace (FP32 and INT8).

    ensemble/mcd/lla: their settings (conf/ensemble, conf/mcd, conf/lla); None takes them from qbdl.run's
    config. Outside qbdl.run also pass `recipe` ({model, dnn, trainer} configs as qbdl.run's).
    """

    def __init__(
        self,
        *args: Any,
        ensemble: Mapping[str, Any] | None = None,
        mcd: Mapping[str, Any] | None = None,
        lla: Mapping[str, Any] | None = None,
        recipe: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.baseline_settings = {"ensemble": ensemble, "mcd": mcd, "lla": lla, **dict(recipe or {})}
        self._trainer: L.Trainer | None = None
        self.baseline_info: dict[str, Any] = {}

    def _config(self) -> dict[str, Any]:
        """qbdl.run's resolved config, with the settings given to this callback on top."""
        run_config = dict(self.run_info.get("config") or {})
        return {**run_config, **{k: v for k, v in self.baseline_settings.items() if v is not None}}

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, shard) -> None:
        """EvaluationCallback's evaluation (with the baselines among the variants), then the speed plot."""
        self._trainer = trainer
        super()._evaluate(trainer, pl_module, shard)
        if shard.is_main and self.results.get("variants"):
            self._speed_plot()

    def _speed_plot(self) -> None:
        """plots/uncertainty_vs_speed.png and results['baselines']; results.json and report.html rewritten."""
        from qbdl.report import plots

        fig = plots.metric_vs_throughput(self.results["variants"])
        path = plots.save_figure(fig, self.out_dir / "plots" / "uncertainty_vs_speed.png")
        self.results["plots"]["uncertainty_vs_speed"] = str(path)
        self.results["baselines"] = self.baseline_info
        write_run_outputs(self.results, self.out_dir)

    def _variants(
        self, pl_module: L.LightningModule, quantized: Mapping[str, Any]
    ) -> tuple[list[Variant], list[str]]:
        """EvaluationCallback's variants plus the requested baselines, in eval.variants order."""
        names = list(self.variant_names or [])
        wanted = {n.removesuffix("_ts") for n in names} & set(BASELINES)
        if not wanted:
            return super()._variants(pl_module, quantized)
        extra = self._baselines(wanted, pl_module, quantized)
        base_names = [n for n in names if n.removesuffix("_ts") not in BASELINES]
        saved = self.variant_names
        self.variant_names = base_names
        try:
            variants, _ = super()._variants(pl_module, quantized)
        finally:
            self.variant_names = saved
        by_name = {v.name: v for v in variants} | extra
        order = dict.fromkeys(n.removesuffix("_ts") for n in names)
        return [by_name[n] for n in order], names

    def _baselines(
        self, wanted: set[str], pl_module: L.LightningModule, quantized: Mapping[str, Any]
    ) -> dict[str, Variant]:
        """Train (or load), quantize and wrap the requested baselines."""
        trainer = self._trainer
        dm = trainer.datamodule
        config = self._config()
        missing = [k for k in ("model", "dnn", "trainer") if k not in config]
        if missing:
            raise ValueError(
                f"the baseline variants {sorted(wanted)} are trained with the DNN recipe, but the evaluation has "
                f"no {missing} settings: run them through qbdl.run, or pass recipe={{model, dnn, trainer}}"
            )
        if self.reference is None:
            raise ValueError(
                "the baseline variants need the stage-1 DNN (reference): ens member 0, lla's backbone"
            )
        out = self.out_dir / "baselines"
        seed = int(config.get("seed", self.seed))
        ptq = next((cb for cb in trainer.callbacks if isinstance(cb, PTQCallback)), None)
        if ptq is None and wanted & {"qens", "qmcd", "qlla"}:
            raise ValueError("the INT8 baselines (qens, qmcd, qlla) need the PTQ callback: remove quant=none")
        calib = None
        if ptq is not None:
            calib = calibration_batches(dm, ptq.calib_batch_size, ptq.options.get("calib_batches"))

        def quantize(name: str, model: nn.Module):
            return quantize_to_file(name, model, calib, ptq.options, ptq.out_dir / f"{name}.qbdl")

        dev = str(pl_module.device)
        variants: dict[str, Variant] = {}
        if wanted & {"ens", "qens"}:
            ens = _need(config, "ensemble", ["ens", "qens"])
            m = int(ens["members"])
            if m < 1:
                raise ValueError(f"ensemble.members must be >= 1, got {m}")
            members = [self.reference.eval()] if ens.get("reuse_dnn", True) else []
            checkpoints = list(ens.get("checkpoints") or [])
            if checkpoints and len(checkpoints) != m - len(members):
                raise ValueError(
                    f"ensemble.checkpoints gives {len(checkpoints)} files for the {m - len(members)} members that are "
                    f"not the stage-1 DNN (ensemble.members={m}, reuse_dnn={bool(members)}): give one file per member"
                )
            seeds = [seed + i * int(ens["seed_stride"]) for i in range(m)]
            for i in range(len(members), m):
                if checkpoints:
                    net = instantiate(config["model"], num_classes=dm.num_classes, in_chans=dm.spec.in_chans)
                    members.append(load_state(net, checkpoints[i - (m - len(checkpoints))]).eval())
                else:
                    members.append(train_dnn_recipe(config, dm, seeds[i], out / f"ens_member{i}.safetensors"))
            self.baseline_info["ens"] = {"members": m, "backbone_passes": m, "seeds": seeds}
            if "ens" in wanted:
                e = Ensemble([mm.to(dev) for mm in members]).eval()
                variants["ens"] = Variant("ens", e, m, state_dict_bytes(e), dev, backbone_passes=m)
            if "qens" in wanted:
                qs = []
                for i, member in enumerate(members):
                    if i == 0 and member is self.reference and "qdnn" in quantized:
                        qs.append(quantized["qdnn"])
                    else:
                        qs.append(quantize(f"qens_member{i}", member))
                e = Ensemble([q.model for q in qs]).eval()
                variants["qens"] = Variant(
                    "qens", e, m, sum(q.size_bytes for q in qs), "cpu", backbone_passes=m
                )
        if wanted & {"mcd", "qmcd"}:
            mc = _need(config, "mcd", ["mcd", "qmcd"])
            p, placement = float(mc["p"]), list(mc["placement"])
            net = train_dnn_recipe(
                config, dm, seed + int(mc["seed_offset"]), out / "mcd.safetensors",
                transform=lambda model: add_mc_dropout(model, p, placement),
            )  # fmt: skip
            samples = int(mc.get("samples") or self.mc_samples)
            self.baseline_info["mcd"] = {"p": p, "placement": placement, "backbone_passes": samples}
            if "mcd" in wanted:
                variants["mcd"] = Variant(
                    "mcd", net.to(dev), samples, state_dict_bytes(net), dev, backbone_passes=samples
                )
            if "qmcd" in wanted:
                q = quantize("qmcd", for_ptq(copy.deepcopy(net).cpu()))
                qm = to_int8_dropout(q.model)
                variants["qmcd"] = Variant("qmcd", qm, samples, q.size_bytes, "cpu", backbone_passes=samples)
        if wanted & {"lla", "qlla"}:
            la = _need(config, "lla", ["lla", "qlla"])
            head_name = la["head"]
            head = copy.deepcopy(self.reference.get_submodule(head_name)).cpu()
            if not isinstance(head, nn.Linear):
                raise ValueError(
                    f"lla.head names the last layer; {head_name!r} is a {type(head).__name__}, not nn.Linear"
                )
            backbone = copy.deepcopy(self.reference).cpu().eval()
            parent, _, child = head_name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, nn.Identity())
            train_loader = (
                dm.calib_dataloader(None) if hasattr(dm, "calib_dataloader") else dm.train_dataloader()
            )
            samples = 1 if la["link"] == "probit" else int(la.get("samples") or self.mc_samples)
            opts = {
                "prior_precisions": list(la["prior_precisions"]),
                "hessian": la["hessian"],
                "link": la["link"],
            }
            for name in sorted(wanted & {"lla", "qlla"}):
                bb = backbone
                size = state_dict_bytes(backbone) + state_dict_bytes(head)
                if name == "qlla":
                    qb = quantize("qlla_backbone", backbone)
                    bb, size = qb.model, qb.size_bytes + state_dict_bytes(head)
                model = fit_last_layer_laplace(bb, head, train_loader, dm.val_dataloader(), **opts).eval()
                self.baseline_info[name] = {**model.fit_report, "hessian": la["hessian"], "link": la["link"],
                                            "backbone_passes": 1, "head_samples": samples}  # fmt: skip
                device = dev if name == "lla" else "cpu"
                variants[name] = Variant(name, model.to(device), samples, size, device, backbone_passes=1)
        return variants
