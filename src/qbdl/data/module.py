"""The LightningDataModule base: shared settings with class-level defaults, loaders, OOD views, data shift."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import lightning as L
import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset

from qbdl.data.splits import TransformSubset, assert_no_test_items, seeded_subset
from qbdl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSpec,
    SpecGeometry,
    SpecTransform,
    as_float_tuple,
)

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack


class DataSettings(TypedDict, total=False):
    """The settings every datamodule shares; each one left out takes the class attribute of the same name."""

    batch_size: int
    eval_batch_size: int | None  # None = batch_size
    num_workers: int
    pin_memory: bool
    seed: int
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    augment: bool


SHARED_SETTINGS: tuple[str, ...] = ("root", *DataSettings.__annotations__)


class _ClassDefault:
    """Marker of a ``root`` argument left out: the class attribute ``root`` applies."""

    def __repr__(self) -> str:
        return "<class default>"


CLASS_DEFAULT: Any = _ClassDefault()


def ood_dataloader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Ordered (unshuffled) loader over an OOD set; items are (x, -1)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


class ImageDataModule(L.LightningDataModule):
    """Base class: shared settings, splits, train/val/test/calib loaders, OOD views and split bookkeeping.

    The shared settings (``SHARED_SETTINGS``) default to the class attributes below; a subclass
    restates only the ones that differ and adds its own settings as keyword-only ``__init__``
    parameters (``defaults()`` lists them all: the record ``conf/data/*.yaml`` repeats in full).

    Subclasses implement ``_setup`` which must fill ``self._datasets`` ('train', 'val', 'test'),
    ``self._calib`` (training items with the eval transform), ``self._raw`` (split -> Dataset of raw
    (image, label) items, used by ``as_ood``), ``self._split_idx`` and the class attributes.
    """

    name: ClassVar[str] = "data"
    # facts of the data set
    in_chans: ClassVar[int] = 3
    num_classes: int = 0  # instance attribute: set in _setup when the data defines it (ImageNet)
    class_names: Sequence[str] = ()
    # class-level defaults of the shared settings (instances hold the values they were built with)
    root: str | Path | None = None
    batch_size: int = 64
    eval_batch_size: int | None = None
    num_workers: int = 2
    pin_memory: bool = False
    seed: int = 0
    image_size: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    augment: bool = True

    def __init__(self, root: str | Path | None = CLASS_DEFAULT, **settings: Unpack[DataSettings]) -> None:
        super().__init__()
        cls = type(self)
        unknown = [k for k in settings if k not in SHARED_SETTINGS]
        if unknown:
            raise TypeError(f"{cls.__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}")
        s: dict[str, Any] = {k: settings.get(k, getattr(cls, k)) for k in SHARED_SETTINGS[1:]}
        root = cls.root if root is CLASS_DEFAULT else root
        self.root = Path(os.path.expanduser(str(root))) if root is not None else None
        self.batch_size = int(s["batch_size"])
        ebs = s["eval_batch_size"]
        self.eval_batch_size = int(ebs) if ebs is not None else self.batch_size
        self.num_workers = int(s["num_workers"])
        self.pin_memory = bool(s["pin_memory"])
        self.seed = int(s["seed"])
        self.image_size = int(s["image_size"])
        self.mean, self.std = as_float_tuple(s["mean"]), as_float_tuple(s["std"])
        self.augment = bool(s["augment"])
        self.num_classes = int(cls.num_classes)
        self.class_names = list(cls.class_names)
        self.spec = ImageSpec(self.image_size, cls.in_chans, self.mean, self.std)
        self.bad_files: list[tuple[str, str]] = []
        self._datasets: dict[str, Dataset] = {}
        self._calib: Dataset | None = None
        self._raw: dict[str, Dataset] = {}
        self._split_idx: dict[str, list[int]] = {}
        self._is_setup = False

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting of this datamodule and its default: the shared ones, then ``__init__``'s own."""
        out = {k: getattr(cls, k) for k in SHARED_SETTINGS}
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out[p.name] = p.default
        return out

    # -- subclass hook
    def _setup(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load and split the data once (idempotent); raises DataNotFoundError on a missing root."""
        if self._is_setup:
            return
        self._setup()
        self._is_setup = True

    def _need(self) -> None:
        if not self._is_setup:
            self.setup()

    def dataset(self, split: str) -> Dataset:
        """The transformed dataset of 'train', 'val' or 'test'."""
        self._need()
        if split not in self._datasets:
            raise KeyError(f"unknown split {split!r}; have {sorted(self._datasets)}")
        return self._datasets[split]

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=gen,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (x [B, C, H, W] float, y [B] long)."""
        return self._loader(self.dataset("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order (model selection: never test items)."""
        ds = self.dataset("val")
        assert_no_test_items(ds, self._datasets.get("test"), f"{self.name} validation set")
        return self._loader(ds, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order."""
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    def calib_dataset(self) -> Dataset:
        """Training items with the eval transform (for PTQ calibration)."""
        self._need()
        assert self._calib is not None
        assert_no_test_items(self._calib, self._datasets.get("test"), f"{self.name} calibration set")
        return self._calib

    def calib_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """TRAINING images with the eval transform, shuffled with a fixed seed; never val/test data."""
        return self._loader(self.calib_dataset(), batch_size or self.batch_size, shuffle=True)

    def ood_datasets(self) -> dict[str, Dataset]:
        """Built-in OOD sets of this module (none by default)."""
        return {}

    def raw_dataset(self, split: str) -> Dataset:
        """Untransformed (image, label) items of a split: PIL images or [C, H, W] tensors in [0, 1]."""
        self._need()
        if split not in self._raw:
            raise KeyError(f"{self.name}: unknown split {split!r}; have {sorted(self._raw)}")
        return self._raw[split]

    def as_ood(self, spec: ImageSpec, n: int | None, seed: int, split: str = "test") -> Dataset:
        """``n`` seeded random images of ``split``, converted to ``spec`` (channels, size, mean/std); items (x, -1)."""
        raw = self.raw_dataset(split)
        chosen = seeded_subset(np.arange(len(raw)), n, seed)  # type: ignore[arg-type]
        return TransformSubset(raw, chosen.tolist(), SpecTransform(spec), label=-1)

    def split_indices(self) -> dict[str, list[int]]:
        """Indices/ids of each split (saved with a run for reproducibility)."""
        self._need()
        return {k: list(v) for k, v in self._split_idx.items()}

    # -- data shift (qbdl.data.shift): corruptions of the test split, applied before normalisation

    def shift_source(self) -> tuple[Dataset, list[int]]:
        """The test split's raw (image, label) items and their stable item ids (ids seed the corruptions).

        Default: the test split's underlying items without its transform (PIL images for on-disk sets).
        """
        self._need()
        test = self._datasets["test"]
        if not isinstance(test, TransformSubset):  # pragma: no cover - every module uses TransformSubset
            raise NotImplementedError(f"{self.name}: override shift_source() for data shift")
        return TransformSubset(test.base, test.indices), list(test.indices)

    def shift_preprocess(self, item: Any) -> torch.Tensor:
        """A raw test image -> float [C, S, S] in [0, 1]: the test transform without its normalisation."""
        self._need()
        pre = getattr(self, "_shift_pre", None)
        if pre is None:
            t = getattr(self._datasets["test"], "transform", None)
            if isinstance(t, T.Compose):
                ops = [o for o in t.transforms if not isinstance(o, T.Normalize)]
                if len(ops) == len(t.transforms):
                    raise NotImplementedError(f"{self.name}: the test transform has no Normalize to strip")
                pre = T.Compose(ops)
            elif isinstance(t, SpecTransform):
                pre = SpecGeometry(t.spec)
            else:  # pragma: no cover - every module's test transform is one of the above
                raise NotImplementedError(f"{self.name}: override shift_preprocess() for data shift")
            self._shift_pre = pre
        x = pre(item)
        x = x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else torch.as_tensor(x)
        return x.float()

    def shift_normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Float [C, S, S] in [0, 1] -> the test split's normalisation (spec mean/std)."""
        mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.spec.std, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / std

    def shift_dataset(
        self,
        corruption: str,
        severity: int,
        seed: int = 0,
        cache: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        max_items: int | None = None,
    ) -> Dataset:
        """The test split with ``corruption`` at ``severity`` applied on the fly; items (normalised x, label).

        Deterministic per (seed, corruption, severity, item id). ``cache``: render every image once into
        memory (and into ``cache_dir/<corruption>/<severity>.pt`` when given, re-used by a resumed run);
        otherwise render on each access. ``max_items``: a seeded subset of the test split.
        """
        from qbdl.data.shift import build_shifted

        raw, ids = self.shift_source()
        if max_items is not None and max_items < len(ids):
            pos = seeded_subset(np.arange(len(ids)), int(max_items), int(seed)).tolist()
            raw, ids = TransformSubset(raw, pos), [ids[p] for p in pos]
        return build_shifted(
            raw,
            ids,
            self.shift_preprocess,
            self.shift_normalize,
            corruption,
            severity,
            seed,
            datamodule_name=self.name,
            image_size=self.spec.image_size,
            channels=self.spec.in_chans,
            materialize=cache,
            cache_dir=cache_dir,
            num_workers=self.num_workers,
        )

    def shift_reader(self, root: str | os.PathLike[str], corruption: str, severity: int) -> Dataset:
        """An official pre-rendered corruption set (ImageNet-C, CIFAR-10-C, MNIST-C) under ``root``."""
        from qbdl.data.shift_sets import official_reader

        return official_reader(self, root, corruption, severity)
