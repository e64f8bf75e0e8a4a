"""Helpers of the run's stages: the OOD sets."""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader

from qbdl.data import leak


def build_object(spec: Mapping[str, Any]) -> Any:
    """An object from a `{_target_: "pkg.mod.Class", **kwargs}` mapping, nested specs first (as Hydra's instantiate)."""
    module, _, name = str(spec["_target_"]).rpartition(".")
    kwargs = {k: _built(v) for k, v in spec.items() if not str(k).startswith("_")}
    return getattr(importlib.import_module(module), name)(**kwargs)


def _built(value: Any) -> Any:
    if isinstance(value, Mapping):
        return build_object(value) if "_target_" in value else {k: _built(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_built(v) for v in value)
    return value


def build_ood_loaders(
    dm: Any, builtin: Sequence[str], extra: Mapping[str, Mapping[str, Any]], batch_size: int
) -> dict:
    """The OOD loaders: `dm`'s built-in sets named in `builtin`, plus sets drawn from other datamodules.

    extra: {name: {datamodule, n, seed, split}}; the datamodule an instance or a config with `_target_`.
    Every set is transformed like `dm` and checked to share no image with `dm`'s test split.
    """
    provided = dm.ood_datasets()
    unknown = [n for n in builtin if n not in provided]
    if unknown:
        raise ValueError(
            f"eval.builtin_ood names {unknown}, but {type(dm).__name__} provides only {sorted(provided)}; "
            "fix eval.builtin_ood or add the set under eval.ood"
        )
    datasets = {n: provided[n] for n in builtin}
    for name, spec in (extra or {}).items():
        source = spec["datamodule"]
        if isinstance(source, Mapping):
            source = build_object(source)
        source.setup("test")
        datasets[name] = source.as_ood(dm.spec, spec["n"], spec["seed"], spec["split"])
    test_ds = dm.test_dataloader().dataset
    loaders = {}
    for name, ds in datasets.items():
        try:
            leak.check_no_leak(test_ds, ds)  # through the module: a test's recorder wraps it there
        except ValueError as exc:
            raise ValueError(f"OOD set {name!r}: {exc}") from exc
        loaders[name] = DataLoader(ds, batch_size=batch_size, shuffle=False)  # ordered; items (x, -1)
    return loaders


__all__ = ["build_object", "build_ood_loaders"]
