"""Index splits of a data set: seeded stratified splits and subsets, label checks, test-leak guards."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from qbdl.data.errors import DataLeakError


class TransformSubset(Dataset):
    """Items ``base[indices[i]]`` with ``transform`` applied to x; optional fixed label (OOD sets use -1)."""

    def __init__(
        self,
        base: Dataset,
        indices: Sequence[int],
        transform: Callable[[Any], torch.Tensor] | None = None,
        label: int | None = None,
    ) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.label = label

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.base[self.indices[i]]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(y if self.label is None else self.label)


def check_labels(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int, where: str) -> None:
    """Raise ValueError when any label is outside ``0..num_classes-1``."""
    arr = np.asarray(labels)
    if arr.size == 0:
        return
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        vals = sorted(set(np.asarray(arr[bad]).tolist()))[:10]
        raise ValueError(
            f"{where}: {int(bad.sum())} label(s) outside 0..{num_classes - 1} (e.g. {vals}); "
            "the data or its metadata does not match the expected classes."
        )


def stratified_split(
    labels: Sequence[int] | np.ndarray, fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Seeded per-class split of ``range(len(labels))`` into named parts with the given fractions.

    The last part takes the remainder of each class, so every item lands in exactly one part.
    """
    labels = np.asarray(labels)
    names = list(fractions)
    fr = np.array([float(fractions[n]) for n in names])
    if (fr < 0).any() or fr.sum() > 1 + 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to <= 1, got {dict(fractions)}")
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        start = 0
        for k, n in enumerate(names):
            stop = len(idx) if k == len(names) - 1 else min(len(idx), start + int(round(fr[k] * len(idx))))
            parts[n].append(idx[start:stop])
            start = stop
    return {n: np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for n, p in parts.items()}


def seeded_subset(indices: Sequence[int] | np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """``n`` seeded random members of ``indices`` (all when n is None or >= len), sorted."""
    indices = np.asarray(indices, dtype=np.int64)
    if n is None or n >= len(indices):
        return indices
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(indices[rng.choice(len(indices), size=n, replace=False)])


def assert_no_test_items(ds: Dataset, test_ds: Dataset | None, what: str) -> None:
    """Raise DataLeakError when ``ds`` draws items of the test split (same underlying data, shared indices).

    Calibration and model selection must never see test data; a split bug would otherwise go unnoticed.
    """
    if (
        not (isinstance(ds, TransformSubset) and isinstance(test_ds, TransformSubset))
        or ds.base is not test_ds.base
    ):
        return  # different underlying sources (e.g. ImageNet train/ vs val/): disjoint by construction
    shared = set(ds.indices) & set(test_ds.indices)
    if shared:
        raise DataLeakError(
            f"{what} contains {len(shared)} test item(s) (e.g. indices {sorted(shared)[:5]}); calibration and "
            "model selection must use training (or validation) data only."
        )
