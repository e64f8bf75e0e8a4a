"""Readers of the official pre-rendered corruption sets: ImageNet-C, CIFAR-10-C, MNIST-C.

Each returns a Dataset of (normalised image tensor, label) prepared like the datamodule's test split:
CIFAR-10-C and MNIST-C images (native size, like the clean test files) go through the datamodule's
own test transform; ImageNet-C images are already the 224x224 centre crops the clean test split is
cut to, so they are only converted to the datamodule's spec (channels, size, mean/std).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from qbdl.data.corruptions import IMAGENET_C, IMAGENET_C_EXTRA, MNIST_C_OFFICIAL
from qbdl.data.errors import DataNotFoundError, not_found_message
from qbdl.data.splits import check_labels
from qbdl.data.transforms import SpecTransform

IMAGENET_C_LAYOUT = """
ROOT/
  gaussian_noise/
    1/  n01440764/*.JPEG ... (1,000 wnid folders, 50 images each, 224x224)
    2/ ... 5/
  shot_noise/ ... (one folder per corruption)
"""
IMAGENET_C_HOW = (
    "download the tarballs (blur.tar, digital.tar, noise.tar, weather.tar, extra.tar) of ImageNet-C from "
    "Zenodo record 2235448 (https://zenodo.org/records/2235448) and extract them all into ROOT."
)
CIFAR10_C_LAYOUT = """
ROOT/
  labels.npy            (uint8/int [50000]: the 10,000 test labels, once per severity)
  gaussian_noise.npy    (uint8 [50000, 32, 32, 3]: severities 1..5, 10,000 images each, in order)
  ... (one .npy per corruption)
"""
CIFAR10_C_HOW = (
    "download CIFAR-10-C.tar from Zenodo record 2535967 (https://zenodo.org/records/2535967) and extract it "
    "(ROOT is the CIFAR-10-C folder)."
)
MNIST_C_LAYOUT = """
ROOT/
  shot_noise/
    test_images.npy     (uint8 [10000, 28, 28, 1])
    test_labels.npy     (uint8/int [10000])
  ... (one folder per corruption; a single severity)
"""
MNIST_C_HOW = (
    "download mnist_c.zip from Zenodo record 3239543 (https://zenodo.org/records/3239543) and extract it "
    "(ROOT is the mnist_c folder)."
)

_OFFICIAL = {
    "imagenet": ("ImageNet-C", (*IMAGENET_C, *IMAGENET_C_EXTRA)),
    "cifar10": ("CIFAR-10-C", (*IMAGENET_C, *IMAGENET_C_EXTRA)),
    "mnist": ("MNIST-C", MNIST_C_OFFICIAL),
}


def official_names(datamodule_name: str) -> list[str] | None:
    """Corruption names of the official set for a datamodule (None: there is none)."""
    entry = _OFFICIAL.get(datamodule_name)
    return None if entry is None else list(entry[1])


def _available(root: Path, files: bool) -> str:
    try:
        names = sorted(
            (p.stem if files else p.name)
            for p in root.iterdir()
            if (p.is_file() and p.suffix == ".npy" and p.stem != "labels") or (not files and p.is_dir())
        )
    except OSError:
        names = []
    return ", ".join(names) if names else "none"


class FileShiftSet(Dataset):
    """(transform(PIL image), label) of image files."""

    def __init__(self, paths: list[str], labels: list[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.labels, self.transform = paths, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            img.load()
            return self.transform(img), int(self.labels[i])


class ArrayShiftSet(Dataset):
    """(transform(PIL image of images[i]), label) of a uint8 array [N, H, W, C] (memory-mapped .npy)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Any], torch.Tensor]
    ) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, H, W, 1|3], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        a = np.asarray(self.images[i])
        img = Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB")
        return self.transform(img), int(self.labels[i])


def _test_like(datamodule: Any) -> Callable[[Any], torch.Tensor]:
    return lambda img: datamodule.shift_normalize(datamodule.shift_preprocess(img))


def imagenet_c(
    root: str | os.PathLike[str],
    corruption: str,
    severity: int,
    class_names: list[str],
    transform: Callable[[Any], torch.Tensor],
) -> FileShiftSet:
    """``ROOT/<corruption>/<severity>/<wnid>/*.JPEG``; labels = index of the wnid in ``class_names``."""
    root = Path(os.path.expanduser(str(root)))
    d = root / corruption / str(int(severity))
    if not root.is_dir():
        raise DataNotFoundError(not_found_message("ImageNet-C", root, IMAGENET_C_LAYOUT, IMAGENET_C_HOW))
    if not d.is_dir():
        raise DataNotFoundError(
            not_found_message(
                "ImageNet-C",
                d,
                IMAGENET_C_LAYOUT,
                IMAGENET_C_HOW,
                problem=f"has no '{corruption}/{int(severity)}' folder (corruptions found: {_available(root, False)})",
            )
        )
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(e.name for e in os.scandir(d) if e.is_dir() and e.name not in class_to_idx)
    if unknown:
        raise ValueError(
            f"ImageNet-C folder '{d}' has wnid folder(s) {unknown[:5]} that the ImageNet datamodule does not "
            "know (its classes come from ImageNet's train/ folder); the two must be the same 1,000 classes."
        )
    samples = make_dataset(str(d), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataNotFoundError(
            not_found_message("ImageNet-C", d, IMAGENET_C_LAYOUT, IMAGENET_C_HOW, problem="has no images")
        )
    return FileShiftSet([p for p, _ in samples], [int(y) for _, y in samples], transform)


def cifar10_c(
    root: str | os.PathLike[str], corruption: str, severity: int, transform: Callable[[Any], torch.Tensor]
) -> ArrayShiftSet:
    """``ROOT/<corruption>.npy`` rows ``(s-1)*n .. s*n`` (n = rows / 5) with ``ROOT/labels.npy``."""
    root = Path(os.path.expanduser(str(root)))
    f, lf = root / f"{corruption}.npy", root / "labels.npy"
    if not root.is_dir() or not lf.is_file():
        raise DataNotFoundError(
            not_found_message("CIFAR-10-C", lf if root.is_dir() else root, CIFAR10_C_LAYOUT, CIFAR10_C_HOW)
        )
    if not f.is_file():
        raise DataNotFoundError(
            not_found_message(
                "CIFAR-10-C",
                f,
                CIFAR10_C_LAYOUT,
                CIFAR10_C_HOW,
                problem=f"not found (corruptions found: {_available(root, True)})",
            )
        )
    images = np.load(f, mmap_mode="r")
    labels = np.load(lf, mmap_mode="r")
    if len(images) % 5 or len(labels) != len(images):
        raise ValueError(
            f"CIFAR-10-C: {f} has {len(images)} images and {lf} {len(labels)} labels; both must hold 5 "
            "severities of the same size (50,000 = 5 x 10,000 in the official set)."
        )
    n = len(images) // 5
    s = int(severity)
    sl = slice((s - 1) * n, s * n)
    check_labels(labels[sl], 10, f"CIFAR-10-C {lf}")
    return ArrayShiftSet(images[sl], np.asarray(labels[sl]), transform)


def mnist_c(
    root: str | os.PathLike[str], corruption: str, transform: Callable[[Any], torch.Tensor]
) -> ArrayShiftSet:
    """``ROOT/<corruption>/test_images.npy`` [N, 28, 28, 1] uint8 with ``test_labels.npy`` (one severity)."""
    root = Path(os.path.expanduser(str(root)))
    d = root / corruption
    if not root.is_dir():
        raise DataNotFoundError(not_found_message("MNIST-C", root, MNIST_C_LAYOUT, MNIST_C_HOW))
    f, lf = d / "test_images.npy", d / "test_labels.npy"
    if not f.is_file() or not lf.is_file():
        raise DataNotFoundError(
            not_found_message(
                "MNIST-C",
                d,
                MNIST_C_LAYOUT,
                MNIST_C_HOW,
                problem=f"not found or incomplete (corruptions found: {_available(root, False)})",
            )
        )
    images, labels = np.load(f, mmap_mode="r"), np.load(lf)
    check_labels(labels, 10, f"MNIST-C {lf}")
    return ArrayShiftSet(images, labels, transform)


def official_reader(datamodule: Any, root: str | os.PathLike[str], corruption: str, severity: int) -> Dataset:
    """The official pre-rendered set that matches ``datamodule`` (by its ``name``)."""
    name = getattr(datamodule, "name", "")
    if name == "imagenet":
        datamodule.setup()  # the class order comes from ImageNet's train/ folder
        return imagenet_c(
            root, corruption, severity, list(datamodule.class_names), SpecTransform(datamodule.spec)
        )
    if name == "cifar10":
        return cifar10_c(root, corruption, severity, _test_like(datamodule))
    if name == "mnist":
        if int(severity) != 1:
            raise ValueError(
                f"MNIST-C has a single severity; asked for severity {severity} (use severities [1])"
            )
        return mnist_c(root, corruption, _test_like(datamodule))
    raise ValueError(
        f"data '{name}' has no official pre-rendered corruption set (readers: imagenet -> ImageNet-C, "
        "cifar10 -> CIFAR-10-C, mnist -> MNIST-C); set shift.root=null to render corruptions on the fly."
    )
