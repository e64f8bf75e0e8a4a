"""Camelyon17-WILDS datamodule on a fabricated copy, read by the real wilds loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import wilds
from fabricate import corrupt_file, make_camelyon17

from qbdl.data import Camelyon17DataModule, DataNotFoundError, ImageSpec, check_no_leak
from qbdl.data.errors import DataLeakError

DIGITS_SPEC = ImageSpec(32, 1, (0.3053,), (0.3760,))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_camelyon17(tmp_path_factory.mktemp("wilds"), n_per_split=8)


def _dm(root: Path, **kw) -> Camelyon17DataModule:
    m = Camelyon17DataModule(root, num_workers=0, batch_size=4, **kw)
    m.setup()
    return m


def test_fabricated_copy_loads_with_real_wilds(root: Path) -> None:
    ds = wilds.get_dataset("camelyon17", root_dir=str(root), download=False)
    assert len(ds) == 32 and ds.n_classes == 2
    counts = {s: int((ds.split_array == c).sum()) for s, c in ds.split_dict.items()}
    assert counts == {"train": 8, "id_val": 8, "test": 8, "val": 8}
    assert ds.get_input(0).size == (96, 96)


def test_shapes_splits_and_ids(root: Path) -> None:
    dm = _dm(root)
    assert dm.num_classes == 2 and dm.class_names == ["normal", "tumor"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 96, 96) and x.dtype == torch.float32 and y.dtype == torch.long
    s = dm.split_indices()
    ds = dm.wilds_dataset
    for role, wsplit in (("train", "train"), ("val", "id_val"), ("test", "test")):
        assert s[role] == dm.wilds_ids(wsplit)
        assert (np.asarray(ds.split_array)[s[role]] == ds.split_dict[wsplit]).all()
    assert not set(s["train"]) & (set(s["val"]) | set(s["test"]))
    # labels follow metadata.csv 'tumor'
    test = dm.dataset("test")
    assert [test[i][1] for i in range(len(test))] == [int(ds.y_array[j]) for j in s["test"]]


def test_caps_are_seeded(root: Path) -> None:
    a = _dm(root, max_train=4, seed=0).split_indices()["train"]
    assert len(a) == 4 and a == _dm(root, max_train=4, seed=0).split_indices()["train"]
    assert any(_dm(root, max_train=4, seed=s).split_indices()["train"] != a for s in (1, 2, 3))


def test_calib_only_training_items(root: Path) -> None:
    dm = _dm(root, max_train=6)
    calib = dm.calib_dataset()
    assert sorted(calib.indices) == sorted(dm.split_indices()["train"])
    n = sum(len(y) for _, y in dm.calib_dataloader(batch_size=4))
    assert n == 6


def test_as_ood_val_to_digits_spec(root: Path) -> None:
    dm = _dm(root)
    ood = dm.as_ood(DIGITS_SPEC, n=5, seed=0, split="val")
    assert len(ood) == 5 and set(ood.indices) <= set(dm.wilds_ids("val"))
    assert ood.indices == dm.as_ood(DIGITS_SPEC, n=5, seed=0, split="val").indices
    x, y = ood[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y == -1
    assert x.min() >= -0.3053 / 0.3760 - 1e-4 and x.max() <= (1 - 0.3053) / 0.3760 + 1e-4
    rgb = dm.as_ood(ImageSpec(64, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), n=None, seed=1, split="val")
    assert len(rgb) == 8 and rgb[0][0].shape == (3, 64, 64)
    with pytest.raises(DataLeakError):
        check_no_leak(dm.dataset("test"), dm.as_ood(dm.spec, n=4, seed=0, split="test"))
    check_no_leak(dm.dataset("test"), dm.as_ood(dm.spec, n=None, seed=0, split="val"))


def test_corrupt_patch_reported(tmp_path: Path) -> None:
    r = make_camelyon17(tmp_path, n_per_split=4)
    ds = wilds.get_dataset("camelyon17", root_dir=str(r), download=False)
    train_ids = np.flatnonzero(ds.split_array == 0)
    val_ids = np.flatnonzero(ds.split_array == 3)
    bad_train = corrupt_file(Path(ds.data_dir) / ds._input_array[train_ids[1]])
    bad_val = corrupt_file(Path(ds.data_dir) / ds._input_array[val_ids[0]])
    dm = _dm(r)
    assert [Path(p) for p, _ in dm.bad_files] == [bad_train]
    assert int(train_ids[1]) not in dm.split_indices()["train"]
    ood = dm.as_ood(DIGITS_SPEC, n=None, seed=0, split="val")
    assert len(ood) == 3 and int(val_ids[0]) not in ood.indices
    assert bad_val in [Path(p) for p, _ in dm.bad_files]


def test_missing_root_message_and_no_side_effect(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as e:
        _dm(missing)
    msg = str(e.value)
    assert "camelyon17_v1.0" in msg and "metadata.csv" in msg and "wilds.stanford.edu" in msg
    assert "download_data.py camelyon17" in msg
    assert not missing.exists()  # wilds would have created it
    r = make_camelyon17(tmp_path / "r", n_per_split=2)
    (r / "camelyon17_v1.0" / "RELEASE_v1.0.txt").unlink()
    with pytest.raises(DataNotFoundError, match="RELEASE_v1.0.txt"):
        _dm(r)


def test_bad_labels_raise(tmp_path: Path) -> None:
    r = make_camelyon17(tmp_path, n_per_split=2)
    meta = r / "camelyon17_v1.0" / "metadata.csv"
    lines = meta.read_text().splitlines()
    head, first = lines[0].split(","), lines[1].split(",")
    first[head.index("tumor")] = "3"
    meta.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="outside 0..1"):
        _dm(r)
