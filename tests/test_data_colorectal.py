"""Colorectal (Kather 2016) datamodule on fabricated folder and zip copies."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import KATHER_CLASSES, corrupt_file, corrupt_zip_member, make_colorectal
from PIL import Image

from qbdl.data import ColorectalDataModule, DataNotFoundError, ImageSpec, check_no_leak
from qbdl.data.errors import BadImageError, DataLeakError

SMALL = dict(image_size=32, num_workers=0, batch_size=8)


def _dm(root: Path, **kw) -> ColorectalDataModule:
    m = ColorectalDataModule(root, **{**SMALL, **kw})
    m.setup()
    return m


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_colorectal(tmp_path_factory.mktemp("crc"), n_per_class=10, size=48)


def test_folder_shapes_classes_splits(folder_root: Path) -> None:
    dm = _dm(folder_root)
    assert dm.num_classes == 8 and dm.class_names == KATHER_CLASSES
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    s = dm.split_indices()
    assert {k: len(v) for k, v in s.items()} == {"train": 56, "val": 8, "test": 16}
    assert not (
        set(s["train"]) & set(s["test"]) or set(s["val"]) & set(s["test"]) or set(s["train"]) & set(s["val"])
    )
    labels = dm.source.labels
    assert np.bincount(labels[s["test"]], minlength=8).tolist() == [2] * 8  # stratified
    assert np.bincount(labels[s["val"]], minlength=8).tolist() == [1] * 8
    # label = folder order
    names = dm.item_names()
    for i in s["test"]:
        assert Path(names[i]).parent.name == KATHER_CLASSES[labels[i]]
    assert _dm(folder_root).split_indices() == s
    assert _dm(folder_root, seed=5).split_indices()["test"] != s["test"]


def test_calib_only_train_and_eval_transform(folder_root: Path) -> None:
    dm = _dm(folder_root, augment=True)
    calib = dm.calib_dataset()
    assert sorted(calib.indices) == sorted(dm.split_indices()["train"])
    assert not set(calib.indices) & set(dm.split_indices()["test"])
    # eval transform: deterministic (no flips) and equal to the test-style transform of the same tile
    assert torch.equal(calib[0][0], calib[0][0])
    xb, yb = next(iter(dm.calib_dataloader(batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.long


def test_zip_reading_matches_folder(tmp_path: Path, folder_root: Path) -> None:
    zroot = make_colorectal(tmp_path / "z", n_per_class=10, size=48, as_zip=True)
    assert not (zroot / "Kather_texture_2016_image_tiles_5000").exists()
    dz, df = _dm(zroot), _dm(folder_root)
    assert dz.split_indices() == df.split_indices()
    assert all("!" in n for n in dz.item_names()[:3])
    # same fabricated pixels (same seed) -> same tensors from zip and from files
    assert torch.allclose(dz.dataset("test")[0][0], df.dataset("test")[0][0])
    x, y = next(iter(dz.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)


def test_zip_read_in_worker_processes(tmp_path: Path) -> None:
    zroot = make_colorectal(tmp_path, n_per_class=4, size=32, as_zip=True)
    dm = ColorectalDataModule(zroot, image_size=32, num_workers=2, batch_size=8, verify=False)
    n = sum(len(y) for _, y in dm.test_dataloader())
    assert n == len(dm.split_indices()["test"])


def test_corrupt_files_reported_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_colorectal(tmp_path, n_per_class=10, size=48)
    tiles = sorted((root / "Kather_texture_2016_image_tiles_5000" / "03_COMPLEX").iterdir())
    corrupt_file(tiles[0])
    (tiles[1]).write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
    assert {Path(p).name for p, _ in dm.bad_files} == {tiles[0].name, tiles[1].name}
    assert all(reason for _, reason in dm.bad_files)
    assert "unreadable" in caplog.text
    names = dm.item_names()
    used = [i for v in dm.split_indices().values() for i in v]
    assert len(used) == 78 and not {names[i] for i in used} & {str(tiles[0]), str(tiles[1])}
    with pytest.raises(BadImageError, match="03_COMPLEX"):
        _dm(root, on_bad_file="error")


def test_corrupt_zip_member(tmp_path: Path) -> None:
    root = make_colorectal(tmp_path, n_per_class=6, size=32, as_zip=True)
    member = corrupt_zip_member(root / "Kather_texture_2016_image_tiles_5000.zip", member_index=0)
    dm = _dm(root)
    assert len(dm.bad_files) == 1 and dm.bad_files[0][0].endswith(member)


def test_gray_rgba_and_odd_size_tiles_are_converted(tmp_path: Path) -> None:
    root = make_colorectal(tmp_path, n_per_class=10, size=48)
    tiles = sorted((root / "Kather_texture_2016_image_tiles_5000" / "01_TUMOR").iterdir())
    Image.new("L", (48, 48), 128).save(tiles[0])
    Image.new("RGBA", (60, 50), (10, 20, 30, 255)).save(tiles[1])
    dm = _dm(root)
    assert dm.bad_files == []
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        for i in range(len(ds)):
            assert ds[i][0].shape == (3, 32, 32)


def test_as_ood_to_digits_spec_and_leak(folder_root: Path) -> None:
    dm = _dm(folder_root)
    spec = ImageSpec(32, 1, (0.3053,), (0.3760,))
    ood = dm.as_ood(spec, n=10, seed=0, split="test")
    assert len(ood) == 10
    x, y = ood[0]
    assert x.shape == (1, 32, 32) and y == -1
    assert x.min() >= (0 - 0.3053) / 0.3760 - 1e-4 and x.max() <= (1 - 0.3053) / 0.3760 + 1e-4
    with pytest.raises(DataLeakError):
        check_no_leak(dm.dataset("test"), dm.as_ood(dm.spec, n=8, seed=1, split="test"))
    check_no_leak(dm.dataset("test"), dm.as_ood(dm.spec, n=8, seed=1, split="train"))


def test_missing_root_and_class_folder(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        _dm(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "01_TUMOR" in msg and "53169" in msg
    assert "scripts/download_data.py colorectal" in msg
    assert isinstance(e.value, FileNotFoundError)
    root = make_colorectal(tmp_path / "r", n_per_class=2, size=16)
    folder = root / "Kather_texture_2016_image_tiles_5000" / "05_DEBRIS"
    for p in folder.iterdir():
        p.unlink()
    with pytest.raises(DataNotFoundError, match="05_DEBRIS"):
        _dm(root)
    folder.rmdir()
    with pytest.raises(DataNotFoundError, match="05_DEBRIS"):
        _dm(root)
