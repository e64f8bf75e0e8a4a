"""Helpers of the run's stages: model files and OOD sets."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from qbdl.io import atomic_write_bytes, safe_load_safetensors


def save_state(model: nn.Module, path: str | Path) -> Path:
    """Save a model's state dict as safetensors, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, save(state))


def load_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a .safetensors or torch state dict (weights_only) into `model`."""
    path = str(path)
    if path.endswith(".safetensors"):
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"model file {path!r} does not exist; give the path of a stage output of an earlier "
                "run (RUN_DIR/dnn.safetensors or RUN_DIR/bnn.safetensors)"
            )
        model.load_state_dict(safe_load_safetensors(path))
    else:
        from qbdl.models import load_weights

        load_weights(model, path)
    return model


def build_ood_loaders(cfg: DictConfig, dm) -> dict:
    """The OOD sets: the datamodule's built-in ones named in eval.builtin_ood, plus eval.ood datamodules."""
    from qbdl.data.base import ood_dataloader
    from qbdl.data.leak import check_no_leak

    builtin = dm.ood_datasets()
    unknown = [n for n in cfg.eval.builtin_ood if n not in builtin]
    if unknown:
        raise ValueError(
            f"eval.builtin_ood names {unknown}, but {type(dm).__name__} provides only {sorted(builtin)}; "
            "fix eval.builtin_ood or add the set under eval.ood"
        )
    datasets = {n: builtin[n] for n in cfg.eval.builtin_ood}
    for name, spec in (cfg.eval.ood or {}).items():
        source = instantiate(spec.datamodule)
        source.setup("test")
        datasets[name] = source.as_ood(dm.spec, spec.n, spec.seed, spec.split)
    test_ds = dm.test_dataloader().dataset
    bs = cfg.eval.batch_size
    loaders = {}
    for name, ds in datasets.items():
        try:
            check_no_leak(test_ds, ds)
        except ValueError as exc:
            raise ValueError(f"OOD set {name!r}: {exc}") from exc
        loaders[name] = ood_dataloader(ds, bs)
    return loaders


__all__ = ["build_ood_loaders", "load_state", "save_state"]
