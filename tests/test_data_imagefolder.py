"""ImageNet datamodule (ImageFolder layout) on a fabricated copy, read by torchvision's ImageFolder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import corrupt_file, make_imagenet
from PIL import Image
from torchvision.datasets import ImageFolder

from qbdl.data import DataNotFoundError, ImageNetDataModule, ImageSpec
from qbdl.data.errors import BadImageError

SMALL = dict(image_size=32, resize_size=36, num_workers=0, batch_size=4, val_fraction=0.25)


def _dm(root: Path, **kw) -> ImageNetDataModule:
    m = ImageNetDataModule(root, **{**SMALL, **kw})
    m.setup()
    return m


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("imagenet"), n_classes=3, n_per_class=8, size=40)


def test_shapes_class_order_and_splits(root: Path) -> None:
    dm = _dm(root)
    assert dm.num_classes == 3
    assert dm.class_names == sorted(p.name for p in (root / "train").iterdir())
    assert dm.class_names == ImageFolder(str(root / "train")).classes  # torchvision weights' order
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    xt, _ = next(iter(dm.test_dataloader()))
    assert xt.shape == (4, 3, 32, 32)
    s = dm.split_indices()
    assert {k: len(v) for k, v in s.items()} == {"train": 18, "val": 6, "test": 24}
    assert not set(s["train"]) & set(s["val"])  # both index train/'s files; test indexes val/
    labels = np.array([y for _, y in ImageFolder(str(root / "train")).samples])
    assert np.bincount(labels[s["val"]]).tolist() == [2, 2, 2]
    assert _dm(root).split_indices() == s
    assert _dm(root, seed=9).split_indices()["val"] != s["val"]


def test_caps_calib_and_val_folder_labels(root: Path) -> None:
    dm = _dm(root, max_train=5, max_test=7)
    s = dm.split_indices()
    assert len(s["train"]) == 5 and len(s["test"]) == 7
    assert sorted(dm.calib_dataset().indices) == sorted(s["train"])
    assert sum(len(y) for _, y in dm.calib_dataloader(batch_size=2)) == 5
    # val/ images are labelled by their wnid folder, with train's class indices
    test = dm.raw_dataset("test")
    for i in range(len(test)):
        _, y = test[i]
        assert 0 <= y < 3


def test_verify_reports_corrupt_and_converts_gray(tmp_path: Path) -> None:
    r = make_imagenet(tmp_path, n_classes=2, n_per_class=4, size=40)
    wnid = sorted((r / "train").iterdir())[0]
    files = sorted(wnid.iterdir())
    corrupt_file(files[0], keep=100)
    Image.new("L", (50, 30), 7).save(files[1], format="JPEG")
    Image.new("CMYK", (50, 30)).save(files[2], format="JPEG")
    dm = _dm(r, verify=True, val_fraction=0.25)
    assert [Path(p).name for p, _ in dm.bad_files] == [files[0].name]
    for split in ("train", "val"):
        ds = dm.dataset(split)
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 32, 32)
    with pytest.raises(BadImageError, match=files[0].name):
        _dm(r, verify=True, on_bad_file="error")
    assert _dm(r, verify=False).bad_files == []


def test_as_ood_gray_spec(root: Path) -> None:
    dm = _dm(root)
    ood = dm.as_ood(ImageSpec(28, 1, (0.5,), (0.5,)), n=6, seed=0)
    x, y = ood[0]
    assert len(ood) == 6 and x.shape == (1, 28, 28) and y == -1
    assert -1 - 1e-4 <= x.min() and x.max() <= 1 + 1e-4


def test_missing_root_split_and_empty_class(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        _dm(tmp_path / "none")
    msg = str(e.value)
    assert str(tmp_path / "none") in msg and "image-net.org" in msg and "n01440764" in msg
    r = make_imagenet(tmp_path / "r", n_classes=2, n_per_class=2, size=16)
    for p in sorted((r / "val").rglob("*.JPEG")):
        p.unlink()
    empty = sorted((r / "val").iterdir())[0]
    with pytest.raises(DataNotFoundError, match=str(empty)):
        _dm(r)
    import shutil

    shutil.rmtree(r / "val")
    with pytest.raises(DataNotFoundError, match="val"):
        _dm(r)


def test_unknown_val_class_is_an_error(tmp_path: Path) -> None:
    r = make_imagenet(tmp_path, n_classes=2, n_per_class=2, size=16)
    (r / "val" / "n99999999").mkdir()
    Image.new("RGB", (16, 16)).save(r / "val" / "n99999999" / "a.JPEG")
    with pytest.raises(ValueError, match="n99999999"):
        _dm(r)
