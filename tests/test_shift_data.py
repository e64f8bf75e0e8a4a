"""Data shift on datamodules: shift_dataset (digits, fabricated MNIST / colorectal), the cache, the readers
of the official pre-rendered sets on fabricated copies, the config group and its validation."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from fabricate import (
    make_cifar10_c,
    make_colorectal,
    make_imagenet,
    make_imagenet_c,
    make_mnist,
    make_mnist_c,
)
from omegaconf import OmegaConf

import qbdl.data.shift as shift
from qbdl.data import (
    CIFAR10DataModule,
    ColorectalDataModule,
    DataNotFoundError,
    DigitsDataModule,
    ImageNetDataModule,
    MNISTDataModule,
)
from qbdl.data.corruptions import IMAGENET_C
from qbdl.data.shift import shift_datasets, validate_shift

CONF = Path(shift.__file__).resolve().parents[1] / "conf" / "shift"


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=16)
    dm.setup()
    return dm


def _cfg(**kw):
    base = {"corruptions": ["fog"], "severities": [1], "seed": 0, "root": None, "cache": True}
    return {**base, **kw}


# --------------------------------------------------------------------------------------------- datasets


def test_digits_shift_dataset(digits: DigitsDataModule) -> None:
    clean = digits.dataset("test")
    ds = digits.shift_dataset("gaussian_noise", 3, seed=0, cache=False)
    assert len(ds) == len(clean) == 503
    x, y = ds[5]
    x0, y0 = clean[5]
    assert x.shape == x0.shape == (1, 16, 16) and x.dtype == torch.float32 and y == y0
    assert (x - x0).abs().mean() > 0.1  # normalised units: clearly corrupted
    # the pre-normalisation path reproduces the clean test images up to uint8 rounding
    raw, ids = digits.shift_source()
    assert ids == digits.split_indices()["test"]
    xr = digits.shift_normalize(digits.shift_preprocess(raw[5][0]))
    torch.testing.assert_close(xr, x0, atol=1e-5, rtol=0)
    # deterministic: a second dataset, materialised, gives the same bytes; another seed does not
    again = digits.shift_dataset("gaussian_noise", 3, seed=0, cache=True)
    assert again.images is not None and torch.equal(again[5][0], x)
    other = digits.shift_dataset("gaussian_noise", 3, seed=1, cache=False)
    assert not torch.equal(other[5][0], x)
    # a subset keeps each item's corruption (seeded by its item id, not its position)
    sub = digits.shift_dataset("gaussian_noise", 3, seed=0, cache=False, max_items=50)
    assert len(sub) == 50
    k = sub.ids[0]
    assert torch.equal(sub[0][0], ds[ds.ids.index(k)][0])


def test_shift_datasets_from_the_digits_config(digits: DigitsDataModule) -> None:
    cfg = OmegaConf.merge({"seed": 3}, {"shift": OmegaConf.load(CONF / "digits.yaml")}).shift
    cfg.cache = False  # lazy: rendering all 12 sets is the evaluation's job (~6 s here)
    sets = shift_datasets(digits, cfg)
    assert [(c, s) for c, s, _ in sets] == [(c, s) for c in cfg.corruptions for s in (1, 3, 5)]
    assert len(cfg.corruptions) == 4
    assert all(len(ds) == 503 and ds.seed == 3 for _, _, ds in sets)
    none = OmegaConf.merge({"seed": 0}, {"shift": OmegaConf.load(CONF / "none.yaml")}).shift
    assert shift_datasets(digits, none) == []


def test_config_files_validate_for_their_data(digits: DigitsDataModule) -> None:
    rgb = CIFAR10DataModule(root=None)
    hist = ColorectalDataModule(root=None)
    mnist = MNISTDataModule(root=None)
    for fname, dm in [
        ("imagenet_c", rgb),
        ("mnist_c", mnist),
        ("mnist_c", digits),
        ("digits", digits),
        ("histology", hist),
        ("none", digits),
    ]:
        cfg = OmegaConf.merge({"seed": 0}, {"shift": OmegaConf.load(CONF / f"{fname}.yaml")}).shift
        assert set(cfg) == set(shift.SHIFT_KEYS), fname
        validate_shift(cfg, dm)
    imc = OmegaConf.load(CONF / "imagenet_c.yaml")
    assert list(imc.corruptions) == list(IMAGENET_C) and list(imc.severities) == [1, 2, 3, 4, 5]


def test_mnist_and_colorectal_shift_datasets(tmp_path: Path) -> None:
    make_mnist(tmp_path / "m", n_train=40, n_test=12)
    dm = MNISTDataModule(tmp_path / "m", num_workers=0)
    dm.setup()
    ds = dm.shift_dataset("rotate", 4, seed=0, cache=False)
    x, y = ds[3]
    x0, y0 = dm.dataset("test")[3]
    assert x.shape == x0.shape == (1, 32, 32) and y == y0 and not torch.equal(x, x0)
    raw, _ = dm.shift_source()
    torch.testing.assert_close(dm.shift_normalize(dm.shift_preprocess(raw[3][0])), x0, atol=1e-5, rtol=0)

    make_colorectal(tmp_path / "c", n_per_class=3, size=40)
    cdm = ColorectalDataModule(tmp_path / "c", image_size=32, num_workers=0, test_fraction=0.34)
    cdm.setup()
    st = cdm.shift_dataset("stain", 5, seed=0, cache=False)
    x, y = st[0]
    x0, y0 = cdm.dataset("test")[0]
    assert x.shape == (3, 32, 32) and y == y0 and (x - x0).abs().mean() > 0.01
    raw, _ = cdm.shift_source()
    torch.testing.assert_close(cdm.shift_normalize(cdm.shift_preprocess(raw[0][0])), x0, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- cache


def test_cache_round_trip_and_corrupt_file(digits: DigitsDataModule, tmp_path: Path, monkeypatch) -> None:
    first = digits.shift_dataset("contrast", 2, seed=0, cache=True, cache_dir=tmp_path)
    path = tmp_path / "contrast" / "2.pt"
    assert path.is_file() and not list(tmp_path.rglob("*.tmp"))
    d = torch.load(path, weights_only=True)
    assert d["images"].dtype == torch.uint8 and d["images"].shape == (503, 1, 16, 16)

    calls = []
    real = shift.render_all
    monkeypatch.setattr(shift, "render_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = digits.shift_dataset("contrast", 2, seed=0, cache=True, cache_dir=tmp_path)
    assert calls == [] and torch.equal(second.images, first.images)  # loaded, not re-rendered

    # truncated file: reported, re-rendered, rewritten
    path.write_bytes(path.read_bytes()[:200])
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        third = digits.shift_dataset("contrast", 2, seed=0, cache=True, cache_dir=tmp_path)
    assert calls == [1] and torch.equal(third.images, first.images)
    assert torch.load(path, weights_only=True)["images"].shape == (503, 1, 16, 16)

    # pixels changed behind the checksum's back
    d = torch.load(path, weights_only=True)
    d["images"][0, 0, 0, 0] ^= 1
    torch.save(d, path)
    with pytest.warns(RuntimeWarning, match="checksum"):
        digits.shift_dataset("contrast", 2, seed=0, cache=True, cache_dir=tmp_path)
    assert calls == [1, 1]

    # a file of another seed is stale, not silently used
    with pytest.warns(RuntimeWarning, match="seed=0"):
        other = digits.shift_dataset("contrast", 2, seed=5, cache=True, cache_dir=tmp_path)
    assert other.seed == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        digits.shift_dataset("contrast", 2, seed=5, cache=True, cache_dir=tmp_path)  # now valid


# --------------------------------------------------------------------------------------------- readers


def test_imagenet_c_reader(tmp_path: Path) -> None:
    make_imagenet(tmp_path / "in", n_classes=3, n_per_class=2, size=40)
    dm = ImageNetDataModule(tmp_path / "in", image_size=32, resize_size=36, num_workers=0)
    dm.setup()
    wnids = dm.class_names
    make_imagenet_c(tmp_path / "inc", wnids[::-1], corruptions=("fog",), severities=(2,), size=32)
    ds = dm.shift_reader(tmp_path / "inc", "fog", 2)
    assert len(ds) == 6
    labels = sorted(ds[i][1] for i in range(len(ds)))
    assert labels == [0, 0, 1, 1, 2, 2]
    x, _ = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.min() < -1  # ImageNet-normalised
    with pytest.raises(DataNotFoundError, match=r"(?s)corruptions found: fog.*zenodo.org/records/2235448"):
        dm.shift_reader(tmp_path / "inc", "snow", 2)
    with pytest.raises(DataNotFoundError, match="2235448"):
        dm.shift_reader(tmp_path / "missing", "fog", 2)
    cfg = _cfg(corruptions=["fog"], severities=[2], root=str(tmp_path / "inc"))
    ((c, s, ds2),) = shift_datasets(dm, cfg)
    assert (c, s, len(ds2)) == ("fog", 2, 6)


def test_cifar10_c_reader(tmp_path: Path) -> None:
    root = make_cifar10_c(tmp_path / "c10c", corruptions=("fog",), n_per_severity=4)
    dm = CIFAR10DataModule(root=None)  # the reader needs no clean CIFAR-10 files
    ds = dm.shift_reader(root, "fog", 3)
    assert len(ds) == 4
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and y == 1
    r = x[0] * dm.spec.std[0] + dm.spec.mean[0]  # undo the normalisation: block 3 has channel 0 = 30
    torch.testing.assert_close(r, torch.full_like(r, 30 / 255), atol=1e-5, rtol=0)
    with pytest.raises(DataNotFoundError, match=r"(?s)corruptions found: fog.*2535967"):
        dm.shift_reader(root, "snow", 1)
    with pytest.raises(DataNotFoundError, match="2535967"):
        dm.shift_reader(tmp_path / "nope", "fog", 1)


def test_mnist_c_reader(tmp_path: Path) -> None:
    root = make_mnist_c(tmp_path / "mc", corruptions=("zigzag", "rotate"), n=7)
    dm = MNISTDataModule(root=None)
    ds = dm.shift_reader(root, "zigzag", 1)
    assert len(ds) == 7
    x, y = ds[2]
    assert x.shape == (1, 32, 32) and y == 2
    with pytest.raises(DataNotFoundError, match=r"(?s)corruptions found: rotate, zigzag.*3239543"):
        dm.shift_reader(root, "fog", 1)
    with pytest.raises(ValueError, match="single severity"):
        dm.shift_reader(root, "zigzag", 2)
    validate_shift(_cfg(corruptions=["zigzag", "canny_edges"], severities=[1], root=str(root)), dm)
    with pytest.raises(ValueError, match="severities=\\[1\\]"):
        validate_shift(_cfg(corruptions=["zigzag"], severities=[1, 2], root=str(root)), dm)


# --------------------------------------------------------------------------------------------- validation


def test_validate_shift_errors(digits: DigitsDataModule) -> None:
    rgb = CIFAR10DataModule(root=None)
    with pytest.raises(ValueError, match=r"unknown corruption\(s\) \['fgo'\]; valid names: gaussian_noise"):
        validate_shift(_cfg(corruptions=["fgo"]), rgb)
    with pytest.raises(ValueError, match="outside 1..5"):
        validate_shift(_cfg(severities=[0, 6]), rgb)
    with pytest.raises(ValueError, match=r"need RGB images but 'digits' is grayscale"):
        validate_shift(_cfg(corruptions=["saturate", "stain"]), digits)
    with pytest.raises(ValueError, match="unknown key"):
        validate_shift(_cfg(corruption=["fog"]), rgb)
    with pytest.raises(ValueError, match="no official pre-rendered"):
        validate_shift(_cfg(root="/somewhere"), digits)
    with pytest.raises(ValueError, match="not in the official set"):
        validate_shift(_cfg(corruptions=["rotate"], root="/somewhere"), rgb)
    with pytest.raises(ValueError) as e:
        validate_shift(_cfg(corruptions=["fgo"], severities=[9]), rgb)
    msg = str(e.value)
    assert "\n" not in msg and "fgo" in msg and "9" in msg  # one paragraph, every problem
    validate_shift(_cfg(corruptions=["stain", "saturate"], severities=[1, 5]), rgb)
