"""Shared pieces of the data layer: ImageSpec, the datamodule base class, splits, OOD views, verification."""

from __future__ import annotations

import io
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from qbdl.data.errors import BadImageError, DataLeakError

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, the weights PIL uses for convert("L"), so tensor and PIL gray conversions agree.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageSpec:
    """How in-distribution images look after the eval transform."""

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"ImageSpec: mean {self.mean} and std {self.std} need one value per channel (in_chans={self.in_chans})"
            )


def as_float_tuple(values: Sequence[float] | float) -> tuple[float, ...]:
    """Config lists (ListConfig, list, tuple or a scalar) as a tuple of floats."""
    if isinstance(values, (int, float)):
        return (float(values),)
    return tuple(float(v) for v in values)


# --------------------------------------------------------------------------------------------- datasets


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


class ImageSource(Dataset):
    """Raw (PIL image, label) items of an on-disk data set, addressable by a global index."""

    labels: np.ndarray

    def open(self, i: int) -> Image.Image:  # pragma: no cover - interface
        """Open item ``i`` as a PIL image (not yet decoded)."""
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - interface
        """A path-like name of item ``i`` for error messages and ``bad_files``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            img = self.open(i)
            img.load()
        except Exception as e:  # a file that went bad after setup's verification (or verify=False)
            raise OSError(f"cannot read image {self.describe(i)}: {type(e).__name__}: {e}") from e
        return img, int(self.labels[i])


class FileSource(ImageSource):
    """Images stored as individual files."""

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int]) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def open(self, i: int) -> Image.Image:
        """Open the file of item ``i``."""
        return Image.open(self.paths[i])

    def describe(self, i: int) -> str:
        """The file path of item ``i``."""
        return self.paths[i]


class ZipSource(ImageSource):
    """Images read straight from members of a zip archive (no extraction)."""

    def __init__(self, zip_path: str | Path, members: Sequence[str], labels: Sequence[int]) -> None:
        self.zip_path = str(zip_path)
        self.members = list(members)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1

    def _zip(self) -> zipfile.ZipFile:
        # One handle per process: a ZipFile shared across forked DataLoader workers would interleave seeks.
        if self._zf is None or self._pid != os.getpid():
            self._zf = zipfile.ZipFile(self.zip_path)
            self._pid = os.getpid()
        return self._zf

    def open(self, i: int) -> Image.Image:
        """Read member ``i`` into memory and open it."""
        return Image.open(io.BytesIO(self._zip().read(self.members[i])))

    def describe(self, i: int) -> str:
        """``archive.zip!member`` of item ``i``."""
        return f"{self.zip_path}!{self.members[i]}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zf"] = None  # ZipFile handles do not pickle (spawned workers)
        return state


# --------------------------------------------------------------------------------------------- transforms


def to_float_image(img: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """PIL image / uint8 array / tensor as a float tensor [C, H, W] in [0, 1]."""
    if isinstance(img, Image.Image):
        if img.mode not in ("L", "RGB"):
            # RGBA, palette, CMYK, 16-bit: RGB is the common denominator; alpha is dropped
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(arr.copy())
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        return t.float().div_(255.0)
    t = torch.as_tensor(img)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    return t.float().div(255.0) if t.dtype == torch.uint8 else t.float()


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Convert [C, H, W] to ``in_chans`` channels: gray->RGB by repetition, RGB->gray by luma weights."""
    c = x.shape[0]
    if c == in_chans:
        return x
    if c == 4:
        x, c = x[:3], 3
        if in_chans == 3:
            return x
    if c == 1:
        return x.expand(in_chans, -1, -1).clone()
    if c == 3 and in_chans == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)
        return (x * w).sum(0, keepdim=True)
    raise ValueError(f"cannot convert a {c}-channel image to {in_chans} channels")


def resize_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop to ``size`` x ``size``."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(
            x.unsqueeze(0), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        )[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top : top + size, left : left + size]
    return x


class _SpecGeometry:
    """Raw image -> float [C, S, S] in [0, 1] matching an ImageSpec's channels and size (no normalisation)."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return resize_center(match_channels(to_float_image(img), self.spec.in_chans), self.spec.image_size)


class SpecTransform:
    """Raw image -> tensor that matches an ImageSpec (channels, size, normalisation)."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = match_channels(to_float_image(img), self.spec.in_chans)
        x = resize_center(x, self.spec.image_size)
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------------------------- splits


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


# --------------------------------------------------------------------------------------------- verification


def image_problem(opener: Callable[[], Image.Image]) -> str | None:
    """Why an image cannot be used (None if it decodes fully)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # PIL warns (e.g. "Truncated File Read") before failing; we report instead
        try:
            with opener() as img:
                img.verify()  # header/CRC checks
            with opener() as img:
                img.load()  # full decode: catches truncated data that verify() misses
                if img.width < 1 or img.height < 1:
                    return "empty image"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    return None


def verify_source(
    source: ImageSource, indices: Sequence[int] | np.ndarray, on_bad_file: str, name: str
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode every image in ``indices``; return the good indices and (path, reason) of bad ones."""
    if on_bad_file not in ("skip", "error"):
        raise ValueError(f"on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    for i in np.asarray(indices, dtype=np.int64).tolist():
        reason = image_problem(lambda i=i: source.open(i))
        if reason is None:
            good.append(i)
        else:
            bad.append((source.describe(i), reason))
    if bad:
        listing = "; ".join(f"{p} ({r})" for p, r in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if on_bad_file == "error":
            raise BadImageError(
                f"{name}: {len(bad)} unreadable image file(s): {listing}. Re-download or delete them, "
                "or set on_bad_file=skip to exclude them (they are then listed in bad_files)."
            )
        log.warning("%s: excluding %d unreadable image file(s): %s", name, len(bad), listing)
    return np.asarray(good, dtype=np.int64), bad


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


# --------------------------------------------------------------------------------------------- loaders


def ood_dataloader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Ordered (unshuffled) loader over an OOD set; items are (x, -1)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


class ImageDataModule(L.LightningDataModule):
    """Base class: splits, train/val/test/calib loaders, OOD views and split bookkeeping.

    Subclasses implement ``_setup`` which must fill ``self._datasets`` ('train', 'val', 'test'),
    ``self._calib`` (training items with the eval transform), ``self._raw`` (split -> Dataset of raw
    (image, label) items, used by ``as_ood``), ``self._split_idx`` and the class attributes.
    """

    name: str = "data"

    def __init__(
        self,
        root: str | Path | None,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        seed: int,
        image_size: int,
    ) -> None:
        super().__init__()
        self.root = Path(os.path.expanduser(str(root))) if root is not None else None
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size is not None else self.batch_size
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.num_classes: int = 0
        self.class_names: list[str] = []
        self.spec: ImageSpec
        self.bad_files: list[tuple[str, str]] = []
        self._datasets: dict[str, Dataset] = {}
        self._calib: Dataset | None = None
        self._raw: dict[str, Dataset] = {}
        self._split_idx: dict[str, list[int]] = {}
        self._is_setup = False

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
                pre = _SpecGeometry(t.spec)
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
