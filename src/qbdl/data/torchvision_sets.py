"""MNIST, Fashion-MNIST, CIFAR-10 and SVHN through torchvision's readers (no download unless asked)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torchvision import datasets as tvd

from qbdl.data.errors import DataNotFoundError, not_found_message
from qbdl.data.module import CLASS_DEFAULT, DataSettings, ImageDataModule
from qbdl.data.splits import TransformSubset, check_labels, seeded_subset, stratified_split

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack


class TorchvisionDataModule(ImageDataModule):
    """Common code: official train split minus a seeded stratified val carve-out; test = official test."""

    name = "torchvision"
    native_size: ClassVar[int] = 28
    in_chans = 1
    num_classes = 10
    required: ClassVar[tuple[str, ...]] = ()  # files (relative to root) torchvision reads
    layout: ClassVar[str] = ""
    url: ClassVar[str] = ""
    flip: ClassVar[bool] = False  # horizontal flips keep the class (CIFAR) or not (digits, SVHN)
    root = "data"
    batch_size = 128
    image_size = 32
    augment = False

    def __init__(
        self,
        root: str | Path | None = CLASS_DEFAULT,
        *,
        val_fraction: float = 0.1,
        max_train: int | None = None,
        max_val: int | None = None,
        max_test: int | None = None,
        download: bool = False,
        **settings: Unpack[DataSettings],
    ) -> None:
        super().__init__(root, **settings)
        self.val_fraction = float(val_fraction)
        self.caps = {"train": max_train, "val": max_val, "test": max_test}
        self.download = bool(download)

    # -- per data set
    def _make(self, train: bool) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    @staticmethod
    def _targets(ds: Any) -> np.ndarray:
        return np.asarray(ds.targets, dtype=np.int64)

    def _not_found(self, problem: str = "not found") -> DataNotFoundError:
        how = (
            f"set `download: true` to let torchvision fetch it from {self.url}, or run "
            f'`python -c "import torchvision; torchvision.datasets.{self._tv_name}(ROOT, download=True)"`.'
        )
        return DataNotFoundError(not_found_message(self._tv_name, self.root, self.layout, how, problem))

    @property
    def _tv_name(self) -> str:
        return type(self).__name__.replace("DataModule", "")

    def transforms(self, train: bool) -> T.Compose:
        """PIL -> normalised tensor; resize when image_size differs from the native size; light augmentation."""
        ops: list[Any] = [T.RGB()] if self.in_chans == 3 else []
        if self.image_size != self.native_size:
            ops.append(T.Resize((self.image_size, self.image_size), antialias=True))
        if train and self.augment:
            ops.append(T.RandomCrop(self.image_size, padding=max(1, self.image_size // 8)))
            if self.flip:
                ops.append(T.RandomHorizontalFlip())
        ops += [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(self.spec.mean, self.spec.std)]
        return T.Compose(ops)

    def shift_preprocess(self, item: Any) -> torch.Tensor:
        """PIL test image -> float [C, S, S] in [0, 1]: the eval transform without Normalize (no setup needed)."""
        pre = getattr(self, "_shift_pre", None)
        if pre is None:
            pre = self._shift_pre = T.Compose(
                [o for o in self.transforms(False).transforms if not isinstance(o, T.Normalize)]
            )
        return pre(item).as_subclass(torch.Tensor).float()

    def _setup(self) -> None:
        if self.root is None:
            raise self._not_found()
        if not self.download:
            missing = [f for f in self.required if not (self.root / f).is_file()]
            if missing:
                raise self._not_found(problem=f"not found (missing {', '.join(missing)})")
        try:
            train_ds, test_ds = self._make(True), self._make(False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise self._not_found(problem=f"could not be read ({e})") from e
        tr_y, te_y = self._targets(train_ds), self._targets(test_ds)
        check_labels(tr_y, self.num_classes, f"{self._tv_name} train")
        check_labels(te_y, self.num_classes, f"{self._tv_name} test")
        parts = stratified_split(
            tr_y, {"val": self.val_fraction, "train": 1.0 - self.val_fraction}, self.seed
        )
        idx = {
            "train": seeded_subset(parts["train"], self.caps["train"], self.seed),
            "val": seeded_subset(parts["val"], self.caps["val"], self.seed + 1),
            "test": seeded_subset(np.arange(len(te_y)), self.caps["test"], self.seed + 2),
        }
        # train/val index the official train split, test the official test split
        self._split_idx = {k: v.tolist() for k, v in idx.items()}
        srcs = {"train": train_ds, "val": train_ds, "test": test_ds}
        ev, tr = self.transforms(False), self.transforms(True)
        self._datasets = {
            k: TransformSubset(srcs[k], self._split_idx[k], tr if k == "train" else ev) for k in srcs
        }
        self._calib = TransformSubset(train_ds, self._split_idx["train"], ev)
        self._raw = {k: TransformSubset(srcs[k], self._split_idx[k]) for k in srcs}


_MNIST_LAYOUT = """
ROOT/
  {d}/raw/
    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte
"""


def _idx_files(folder: str) -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
    )


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (torchvision reads ROOT/MNIST/raw/*-ubyte)."""

    name = "mnist"
    required = _idx_files("MNIST")
    layout = _MNIST_LAYOUT.format(d="MNIST")
    url = "https://yann.lecun.com/exdb/mnist/ (torchvision mirrors)"
    class_names = tuple(tvd.MNIST.classes)
    mean = (0.1307,)
    std = (0.3081,)

    def _make(self, train: bool) -> Any:
        return tvd.MNIST(str(self.root), train=train, download=self.download)


class FashionMNISTDataModule(TorchvisionDataModule):
    """Fashion-MNIST (torchvision reads ROOT/FashionMNIST/raw/*-ubyte)."""

    name = "fashion_mnist"
    required = _idx_files("FashionMNIST")
    layout = _MNIST_LAYOUT.format(d="FashionMNIST")
    url = "https://github.com/zalandoresearch/fashion-mnist"
    class_names = tuple(tvd.FashionMNIST.classes)
    mean = (0.2860,)
    std = (0.3530,)

    def _make(self, train: bool) -> Any:
        return tvd.FashionMNIST(str(self.root), train=train, download=self.download)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (torchvision reads ROOT/cifar-10-batches-py/)."""

    name = "cifar10"
    native_size = 32
    in_chans = 3
    flip = True
    required = tuple(
        f"cifar-10-batches-py/{f}" for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    )
    layout = """
ROOT/
  cifar-10-batches-py/
    data_batch_1 ... data_batch_5  test_batch  batches.meta
"""
    url = "https://www.cs.toronto.edu/~kriz/cifar.html"
    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    augment = True

    def _make(self, train: bool) -> Any:
        return tvd.CIFAR10(str(self.root), train=train, download=self.download)


class SVHNDataModule(TorchvisionDataModule):
    """SVHN cropped digits (torchvision reads ROOT/{train,test}_32x32.mat; label 10 becomes 0)."""

    name = "svhn"
    native_size = 32
    in_chans = 3
    required = ("train_32x32.mat", "test_32x32.mat")
    layout = """
ROOT/
  train_32x32.mat
  test_32x32.mat
"""
    url = "http://ufldl.stanford.edu/housenumbers/"
    class_names = tuple(str(i) for i in range(10))
    root = "data/svhn"
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)

    @staticmethod
    def _targets(ds: Any) -> np.ndarray:
        return np.asarray(ds.labels, dtype=np.int64)

    def _make(self, train: bool) -> Any:
        return tvd.SVHN(str(self.root), split="train" if train else "test", download=self.download)
