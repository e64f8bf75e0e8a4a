"""The run's parts from its config, in one place: `build_run(cfg)` for a new run, `load_run(run_dir)` for a finished one.

`qbdl.pipeline.run`, `python -m qbdl.fidelity` and scripts/calibration_study.py construct runs only here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qbdl.bayes import dnn_to_bnn
from qbdl.data.shift import validate_shift
from qbdl.experiment.results import RESULTS_FILE
from qbdl.experiment.stages import build_ood_loaders
from qbdl.models.files import load_state
from qbdl.quant import load_qbnn


@dataclass
class Run:
    """A run's data (set up for fit), stage-1 network and the BNN stage's callbacks (quant, evaluation, extra)."""

    cfg: DictConfig
    dm: Any
    dnn: nn.Module
    ood: dict  # {name: DataLoader} on the datamodule's transforms, checked for leaks into the test split
    evaluation: Any = None  # qbdl.lit.callbacks.EvaluationCallback (or a subclass); None when callbacks=False
    callbacks: list = field(default_factory=list)


@dataclass
class LoadedRun:
    """A finished run rebuilt from its directory: BNN and QBNN with their saved weights, data, OOD, config."""

    bnn: nn.Module
    qbnn: nn.Module
    dm: Any
    ood: dict
    config: dict

    def astuple(self) -> tuple[nn.Module, nn.Module, Any, dict, dict]:
        """(bnn, qbnn, datamodule, ood loaders, config)."""
        return self.bnn, self.qbnn, self.dm, self.ood, self.config


def build_run(cfg: DictConfig, *, callbacks: bool = True, pretrained: bool = True) -> Run:
    """Datamodule (set up), DNN and callbacks of `cfg`; bad quant/eval options and OOD sets fail here.

    callbacks=False builds no callback (the OOD loaders from the `eval` settings alone, as the evaluation
    callback builds them: a results.json written outside qbdl.run records settings, not `_target_`s);
    pretrained=False never fetches pretrained model weights (a saved state replaces them).
    """
    dm = instantiate(cfg.data)
    dm.setup("fit")
    if cfg.get("shift"):  # bad corruption names, severities or RGB-only corruptions fail before training
        validate_shift(OmegaConf.to_container(cfg.shift, resolve=True), dm)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    if not pretrained:
        model_cfg |= {k: None for k in ("weights", "weights_path") if k in model_cfg}
    dnn = instantiate(model_cfg, num_classes=dm.num_classes, in_chans=dm.spec.in_chans)
    if not callbacks:
        ev = _plain(cfg.eval)
        ood = build_ood_loaders(
            dm, ev.get("builtin_ood") or (), ev.get("ood") or {}, ev.get("batch_size", 256)
        )
        return Run(cfg, dm, dnn, ood)
    # The BNN stage's callbacks, built before any training: bad quant/eval options and OOD sets fail now.
    parts = [instantiate(cfg.quant, reference=dnn)] if cfg.get("quant") else []
    evaluation = instantiate(cfg.eval, reference=dnn)
    ood = evaluation.ood_loaders_for(dm)
    parts.append(evaluation)
    parts += [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return Run(cfg, dm, dnn, ood, evaluation, parts)


def run_config(run_dir: str | Path) -> DictConfig:
    """The resolved config a finished run recorded in its results.json."""
    res_file = Path(run_dir) / RESULTS_FILE
    if not res_file.is_file():
        raise FileNotFoundError(
            f"{res_file} does not exist: give the output directory of a finished qbdl.run"
        )
    return OmegaConf.create(json.loads(res_file.read_text())["config"])


def load_run(run_dir: str | Path) -> LoadedRun:
    """The BNN (bnn.safetensors), QBNN (models/qbnn.qbdl), data and OOD loaders of a finished qbdl.run directory."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    run = build_run(cfg, callbacks=False, pretrained=False)
    bnn = dnn_to_bnn(run.dnn, **_plain(cfg.bayes))
    load_state(bnn, run_dir / "bnn.safetensors")
    qbnn = load_qbnn(str(run_dir / "models" / "qbnn.qbdl"))
    return LoadedRun(bnn.eval(), qbnn, run.dm, run.ood, OmegaConf.to_container(cfg, resolve=True))


def _plain(node: Any) -> Mapping[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


__all__ = ["LoadedRun", "Run", "build_run", "load_run", "run_config"]
