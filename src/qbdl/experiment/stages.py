"""Helpers of the run's stages: the OOD sets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra.utils import instantiate


def build_ood_loaders(
    dm: Any, builtin: Sequence[str], extra: Mapping[str, Mapping[str, Any]], batch_size: int
) -> dict:
    """The OOD loaders: `dm`'s built-in sets named in `builtin`, plus sets drawn from other datamodules.

    extra: {name: {datamodule, n, seed, split}}; the datamodule an instance or a config with `_target_`.
    Every set is transformed like `dm` and checked to share no image with `dm`'s test split.
    """
    from qbdl.data.leak import check_no_leak
    from qbdl.data.module import ood_dataloader

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
            source = instantiate(source)
        source.setup("test")
        datasets[name] = source.as_ood(dm.spec, spec["n"], spec["seed"], spec["split"])
    test_ds = dm.test_dataloader().dataset
    loaders = {}
    for name, ds in datasets.items():
        try:
            check_no_leak(test_ds, ds)
        except ValueError as exc:
            raise ValueError(f"OOD set {name!r}: {exc}") from exc
        loaders[name] = ood_dataloader(ds, batch_size)
    return loaders


__all__ = ["build_ood_loaders"]
