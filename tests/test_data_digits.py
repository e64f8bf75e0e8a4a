"""Digits datamodule: real sklearn data, splits, OOD sets, as_ood, leak check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qbdl.data import DigitsDataModule, ImageSpec, check_no_leak, ood_dataloader
from qbdl.data.digits import photo_patches
from qbdl.data.errors import DataLeakError


@pytest.fixture(scope="module")
def dm() -> DigitsDataModule:
    m = DigitsDataModule(seed=0)
    m.setup()
    return m


def test_sizes_shapes_and_dtypes(dm: DigitsDataModule) -> None:
    sizes = {k: len(v) for k, v in dm.split_indices().items()}
    assert sum(sizes.values()) == 1797
    assert 480 <= sizes["test"] <= 540 and sizes["val"] > 100
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    assert dm.spec == ImageSpec(16, 1, (0.3053,), (0.3760,))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        xb, yb = next(iter(loader))
        assert xb.shape[1:] == (1, 16, 16) and yb.dtype == torch.long
    # normalised with the configured statistics of the digits: about zero mean, unit std
    allx = torch.stack([dm.dataset("train")[i][0] for i in range(len(dm.dataset("train")))])
    assert abs(allx.mean().item()) < 0.1 and 0.7 < allx.std().item() < 1.1
    dm.setup()  # idempotent
    assert len(dm.dataset("train")) == sizes["train"]


def test_splits_disjoint_stratified_reproducible(dm: DigitsDataModule) -> None:
    s = dm.split_indices()
    a, b, c = (set(s[k]) for k in ("train", "val", "test"))
    assert not (a & b or a & c or b & c) and len(a | b | c) == 1797
    labels = dm.labels.numpy()
    for part, frac in (("train", 0.6), ("test", 0.28)):
        counts = np.bincount(labels[s[part]], minlength=10)
        expected = frac * np.bincount(labels, minlength=10)
        assert np.all(np.abs(counts - expected) <= 1)
    again = DigitsDataModule(seed=0)
    again.setup()
    assert again.split_indices() == s
    other = DigitsDataModule(seed=1)
    other.setup()
    assert other.split_indices()["test"] != s["test"]


def test_calib_only_training_items(dm: DigitsDataModule) -> None:
    calib = dm.calib_dataset()
    assert sorted(calib.indices) == sorted(dm.split_indices()["train"])
    train_keys = {dm.dataset("train")[i][0].numpy().tobytes() for i in range(len(dm.dataset("train")))}
    eval_keys = {
        dm.dataset(k)[i][0].numpy().tobytes() for k in ("val", "test") for i in range(len(dm.dataset(k)))
    } - train_keys  # sklearn digits has a few exact duplicates across splits
    seen = 0
    for x, _ in dm.calib_dataloader(batch_size=100):
        for xi in x:
            key = xi.numpy().tobytes()
            assert key in train_keys and key not in eval_keys
            seen += 1
    assert seen == len(dm.split_indices()["train"])
    first = next(iter(dm.calib_dataloader(batch_size=8)))[0]
    assert torch.equal(first, next(iter(dm.calib_dataloader(batch_size=8)))[0])  # fixed shuffle seed


def test_photo_patches_textured_and_in_digit_range(dm: DigitsDataModule) -> None:
    raw = dm.ood_raw()
    photos = raw["photos"]
    assert photos.shape == (dm.n_photos, 8, 8) and dm.n_photos == 256  # the default (data.n_photos)
    assert photos.min() >= 0 and photos.max() <= 16
    assert torch.equal(photos, photos.round())
    assert all(len(torch.unique(p)) >= 10 for p in photos)
    assert len(photo_patches(10)) > 1000  # both photographs contribute many textured patches
    ood = dm.ood_datasets()
    assert set(ood) == {"photos", "rotated"}
    x, y = next(iter(ood_dataloader(ood["photos"], batch_size=16)))
    assert x.shape == (16, 1, 16, 16) and (y == -1).all() and y.dtype == torch.long
    # the same transform as the in-distribution data
    assert torch.allclose(ood["photos"][3][0], dm.transform_raw(photos[3:4])[0])


def test_rotated_is_rot90_of_test(dm: DigitsDataModule) -> None:
    test_raw = dm.images_raw[dm.split_indices()["test"]]
    assert torch.equal(dm.ood_raw()["rotated"], torch.rot90(test_raw, 1, dims=(-2, -1)))
    rot = dm.ood_datasets()["rotated"]
    test = dm.dataset("test")
    for i in (0, 7, len(test) - 1):
        assert torch.allclose(rot[i][0], torch.rot90(test[i][0], 1, dims=(-2, -1)), atol=1e-5)


def test_as_ood_other_spec_and_leak_check(dm: DigitsDataModule) -> None:
    spec = ImageSpec(96, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ood = dm.as_ood(spec, n=20, seed=3)
    x, y = ood[0]
    assert x.shape == (3, 96, 96) and y == -1
    raw = dm.raw_dataset("test")[ood.indices[0]][0]  # [1, 8, 8] in [0, 1]
    lo = (raw.min() - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    hi = (raw.max() - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    for c in range(3):
        assert lo[c] - 1e-4 <= x[c].min() and x[c].max() <= hi[c] + 1e-4
    assert torch.allclose(x[0] * spec.std[0] + spec.mean[0], x[1] * spec.std[1] + spec.mean[1], atol=1e-5)
    assert dm.as_ood(spec, 20, 3).indices == ood.indices and dm.as_ood(spec, 20, 4).indices != ood.indices
    with pytest.raises(DataLeakError):
        check_no_leak(dm.dataset("test"), dm.as_ood(dm.spec, n=30, seed=0, split="test"))
    check_no_leak(dm.dataset("test"), dm.ood_datasets()["photos"])


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        DigitsDataModule(train_fraction=0.7, val_fraction=0.2, test_fraction=0.3)
