"""MNIST / Fashion-MNIST on fabricated idx files (real torchvision readers); missing-root errors for all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import make_fashion_mnist, make_mnist
from torchvision.datasets import MNIST

from qbdl.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    FashionMNISTDataModule,
    ImageSpec,
    MNISTDataModule,
    SVHNDataModule,
)

RGB96 = ImageSpec(96, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_fabricated_idx_files_read_by_torchvision(tmp_path: Path) -> None:
    make_mnist(tmp_path, n_train=30, n_test=20)
    ds = MNIST(str(tmp_path), train=True, download=False)
    assert len(ds) == 30 and ds.data.shape == (30, 28, 28) and ds.targets.tolist()[:12] == [*range(10), 0, 1]


@pytest.mark.parametrize(
    ("cls", "make"), [(MNISTDataModule, make_mnist), (FashionMNISTDataModule, make_fashion_mnist)]
)
def test_idx_datamodules(tmp_path: Path, cls: type, make) -> None:
    make(tmp_path, n_train=100, n_test=40)
    dm = cls(tmp_path, num_workers=0, batch_size=16)
    dm.setup()
    assert dm.num_classes == 10 and len(dm.class_names) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    s = dm.split_indices()
    assert {k: len(v) for k, v in s.items()} == {"train": 90, "val": 10, "test": 40}
    assert not set(s["train"]) & set(s["val"])
    assert np.bincount(np.arange(100)[s["val"]] % 10).tolist() == [1] * 10  # stratified (labels cycle 0..9)
    assert sorted(dm.calib_dataset().indices) == sorted(s["train"])
    other = cls(tmp_path, num_workers=0, seed=1)
    other.setup()
    assert other.split_indices()["val"] != s["val"]
    ood = dm.as_ood(RGB96, n=7, seed=0)
    xo, yo = ood[0]
    assert len(ood) == 7 and xo.shape == (3, 96, 96) and yo == -1
    assert torch.allclose(xo[0] * 0.229 + 0.485, xo[2] * 0.225 + 0.406, atol=1e-5)  # gray -> RGB


def test_caps(tmp_path: Path) -> None:
    make_mnist(tmp_path, n_train=100, n_test=40)
    dm = MNISTDataModule(tmp_path, num_workers=0, max_train=20, max_val=3, max_test=5, image_size=28)
    dm.setup()
    assert {k: len(v) for k, v in dm.split_indices().items()} == {"train": 20, "val": 3, "test": 5}
    assert dm.dataset("test")[0][0].shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("cls", "needle"),
    [
        (MNISTDataModule, "MNIST/raw/train-images-idx3-ubyte"),
        (FashionMNISTDataModule, "FashionMNIST/raw"),
        (CIFAR10DataModule, "cifar-10-batches-py"),
        (SVHNDataModule, "train_32x32.mat"),
    ],
)
def test_missing_root(tmp_path: Path, cls: type, needle: str) -> None:
    dm = cls(tmp_path / "missing", num_workers=0)
    with pytest.raises(DataNotFoundError) as e:
        dm.setup()
    msg = str(e.value)
    assert str(tmp_path / "missing") in msg and needle in msg and "download: true" in msg
    assert not (tmp_path / "missing").exists()


def test_corrupt_cifar_is_reported_as_not_found(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / f).write_bytes(b"junk")
    with pytest.raises(DataNotFoundError, match="could not be read"):
        CIFAR10DataModule(tmp_path, num_workers=0).setup()


def test_out_of_range_labels(tmp_path: Path) -> None:
    make_mnist(tmp_path, n_train=20, n_test=10)
    lab = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(lab.read_bytes())
    data[8] = 12  # first label byte after the 8-byte header
    lab.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="outside 0..9"):
        MNISTDataModule(tmp_path, num_workers=0).setup()
