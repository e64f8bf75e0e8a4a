"""ImageNet in ImageFolder layout ``root/{train,val}/<wnid>/*.JPEG``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from qbdl.data.errors import DataNotFoundError, not_found_message
from qbdl.data.module import CLASS_DEFAULT, DataSettings, ImageDataModule
from qbdl.data.sources import FileSource, verify_source
from qbdl.data.splits import TransformSubset, check_labels, seeded_subset, stratified_split

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

IMAGENET_LAYOUT = """
ROOT/
  train/
    n01440764/  n01440764_10026.JPEG ...   (1,000 wnid folders, ~1.28M images)
    ...
  val/
    n01440764/  ILSVRC2012_val_00000293.JPEG ...   (same wnid folders, 50,000 images)
"""
IMAGENET_HOW = (
    "download ILSVRC2012 (train and val tarballs) from https://image-net.org/download.php (login required), "
    "extract the train tarball into train/<wnid>/ and sort the flat val images into val/<wnid>/ "
    "(e.g. torchvision.datasets.ImageNet(root, split='val') or the common valprep.sh script)."
)


def imagenet_transforms(
    image_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float], train: bool
) -> T.Compose:
    """Standard torchvision recipe: RandomResizedCrop+flip (train) or Resize+CenterCrop (eval)."""
    if train:
        geo = [T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip()]
    else:
        geo = [T.Resize(resize_size, antialias=True), T.CenterCrop(image_size)]
    # gray / CMYK / RGBA JPEGs exist in ImageNet: converting to RGB is normal, not an error
    return T.Compose(
        [T.RGB(), *geo, T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    )


def _scan(folder: Path, class_to_idx: dict[str, int] | None = None) -> tuple[list[str], list[str], list[int]]:
    """Class folders, file paths and labels of one ImageFolder split, with clear errors for empty folders."""
    if not folder.is_dir():
        raise DataNotFoundError(not_found_message("ImageNet", folder, IMAGENET_LAYOUT, IMAGENET_HOW))
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataNotFoundError(
            not_found_message(
                "ImageNet", folder, IMAGENET_LAYOUT, IMAGENET_HOW, problem="has no class folders"
            )
        )
    for c in classes:
        d = folder / c
        if not any(
            os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS for e in os.scandir(d) if e.is_file()
        ):
            raise DataNotFoundError(
                f"ImageNet class folder '{d}' is empty (no {'/'.join(IMG_EXTENSIONS)} files); every wnid "
                "folder needs images. Re-extract that class or remove the folder from every split."
            )
    if class_to_idx is None:
        # torchvision's own reader defines the order: sorted wnids == the order of torchvision's weights
        folder_ds = ImageFolder(str(folder))
        samples, class_to_idx = folder_ds.samples, folder_ds.class_to_idx
    else:
        unknown = sorted(set(classes) - set(class_to_idx))
        if unknown:
            raise ValueError(f"ImageNet: class folder(s) {unknown[:5]} in '{folder}' do not exist in train/")
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS)
    paths = [p for p, _ in samples]
    labels = [int(y) for _, y in samples]
    return sorted(class_to_idx, key=class_to_idx.__getitem__), paths, labels


class ImageNetDataModule(ImageDataModule):
    """ImageNet-1k: train = train/ minus a seeded val carve-out; test = the official val/ folder."""

    name = "imagenet"
    root = "data/imagenet"
    num_workers = 4

    def __init__(
        self,
        root: str | Path | None = CLASS_DEFAULT,
        *,
        resize_size: int = 256,
        val_fraction: float = 0.01,
        max_train: int | None = None,
        max_val: int | None = None,
        max_test: int | None = None,
        verify: bool | str = "header",
        on_bad_file: str = "skip",
        **settings: Unpack[DataSettings],
    ) -> None:
        super().__init__(root, **settings)
        self.resize_size = int(resize_size)
        self.val_fraction = float(val_fraction)
        self.caps = {"train": max_train, "val": max_val, "test": max_test}
        if verify not in (True, False, "header"):
            raise ValueError(
                f"ImageNet verify must be true (decode every image), header or false, got {verify!r}"
            )
        self.verify = verify
        self.on_bad_file = str(on_bad_file)

    def _setup(self) -> None:
        if self.root is None or not self.root.is_dir():
            raise DataNotFoundError(not_found_message("ImageNet", self.root, IMAGENET_LAYOUT, IMAGENET_HOW))
        classes, tr_paths, tr_labels = _scan(self.root / "train")
        class_to_idx = {c: i for i, c in enumerate(classes)}
        _, te_paths, te_labels = _scan(self.root / "val", class_to_idx)
        self.class_names, self.num_classes = classes, len(classes)
        check_labels(tr_labels, self.num_classes, "ImageNet train/")
        check_labels(te_labels, self.num_classes, "ImageNet val/")
        train_src, test_src = FileSource(tr_paths, tr_labels), FileSource(te_paths, te_labels)

        parts = stratified_split(
            train_src.labels, {"val": self.val_fraction, "train": 1.0 - self.val_fraction}, self.seed
        )
        idx = {
            "train": seeded_subset(parts["train"], self.caps["train"], self.seed),
            "val": seeded_subset(parts["val"], self.caps["val"], self.seed + 1),
            "test": seeded_subset(np.arange(len(test_src)), self.caps["test"], self.seed + 2),
        }
        self.bad_files = []
        if self.verify:
            for split, src in (("train", train_src), ("val", train_src), ("test", test_src)):
                idx[split], bad = verify_source(
                    src, idx[split], self.on_bad_file, f"ImageNet {split}", full=self.verify is True
                )
                self.bad_files += bad
        # train/val index into train/'s sorted files, test into val/'s sorted files
        self._split_idx = {k: v.tolist() for k, v in idx.items()}
        mean, std = self.spec.mean, self.spec.std
        ev = imagenet_transforms(self.image_size, self.resize_size, mean, std, train=False)
        tr = (
            imagenet_transforms(self.image_size, self.resize_size, mean, std, train=True)
            if self.augment
            else ev
        )
        srcs = {"train": train_src, "val": train_src, "test": test_src}
        self._datasets = {
            k: TransformSubset(srcs[k], self._split_idx[k], tr if k == "train" else ev) for k in srcs
        }
        self._calib = TransformSubset(train_src, self._split_idx["train"], ev)
        self._raw = {k: TransformSubset(srcs[k], self._split_idx[k]) for k in srcs}
