"""Data-layer helpers and the conf/data yaml files (keys and values == the class defaults, instantiable)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from qbdl.data import (
    DigitsDataModule,
    ImageDataModule,
    ImageSpec,
    SpecTransform,
    check_no_leak,
    fingerprint,
    stratified_split,
)
from qbdl.data.errors import DataLeakError
from qbdl.data.module import SHARED_SETTINGS
from qbdl.data.splits import TransformSubset, seeded_subset
from qbdl.data.transforms import match_channels

CONF = Path(__file__).resolve().parents[1] / "src" / "qbdl" / "conf" / "data"
NAMES = ["digits", "imagenet", "colorectal", "camelyon17", "mnist", "fashion_mnist", "cifar10", "svhn"]


def _yaml(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=False)


def _plain(v: object) -> object:
    """Lists/tuples/mappings of a yaml value or a code default in one comparable form."""
    if isinstance(v, (list, tuple)):
        return tuple(v)
    if isinstance(v, Mapping):
        return dict(v)
    return v


@pytest.mark.parametrize("name", NAMES)
def test_yaml_keys_and_values_are_the_class_defaults(name: str) -> None:
    cfg = _yaml(name)
    cls = get_class(cfg.pop("_target_"))
    defaults = cls.defaults()
    assert set(cfg) == set(defaults), f"{name}: yaml keys differ from {cls.__name__}.defaults()"
    # the constructor takes exactly these: the shared settings plus its own keyword-only parameters
    params = inspect.signature(cls.__init__).parameters
    own = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(cfg) == set(SHARED_SETTINGS) | own and not own & set(SHARED_SETTINGS)
    for k in set(cfg) - {"root"}:  # the code's defaults are the yaml's values
        assert _plain(cfg[k]) == _plain(defaults[k]), (
            f"{name}.{k}: yaml {cfg[k]!r} != code default {defaults[k]!r}"
        )


def _setting(dm: ImageDataModule, key: str) -> object:
    """The value a datamodule holds for one of its settings (a few are kept under another name)."""
    if key.startswith("max_"):
        return dm.caps[key[4:]]
    if key == "source":
        return dm.source_kind
    if key in ("train_fraction", "val_fraction", "test_fraction") and hasattr(dm, "fractions"):
        return dm.fractions[key.removesuffix("_fraction")]
    return getattr(dm, key)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_instantiates_to_its_values(name: str, tmp_path: Path) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.root = str(tmp_path)
    dm = instantiate(cfg)
    values = OmegaConf.to_container(cfg, resolve=True)
    cls = get_class(values.pop("_target_"))
    assert type(dm) is cls and dm.root == tmp_path
    ebs = values.pop("eval_batch_size")
    assert dm.eval_batch_size == (dm.batch_size if ebs is None else ebs)
    for k, v in values.items():
        if k != "root":
            assert _plain(_setting(dm, k)) == _plain(v), f"{name}.{k}"
    assert dm.spec == ImageSpec(
        values["image_size"], cls.in_chans, tuple(values["mean"]), tuple(values["std"])
    )
    # left-out settings fall back to the same values: the yaml and the class defaults build the same object
    assert vars(dm) == vars(cls(tmp_path))


@pytest.mark.parametrize("name", NAMES)
def test_settings_override_the_class_defaults(name: str, tmp_path: Path) -> None:
    cls = get_class(_yaml(name)["_target_"])
    before = cls.defaults()
    dm = cls(tmp_path, batch_size=3, eval_batch_size=5, num_workers=0, seed=7, image_size=24, augment=False)
    assert (dm.batch_size, dm.eval_batch_size, dm.num_workers, dm.seed, dm.augment) == (3, 5, 0, 7, False)
    assert dm.spec.image_size == 24 and dm.spec.mean == tuple(before["mean"])
    assert cls.defaults() == before and cls.batch_size == before["batch_size"]  # the class is untouched
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch_sise'"):
        cls(tmp_path, batch_sise=3)


def _datamodule_classes() -> list[type]:
    seen, todo = [], [ImageDataModule]
    while todo:
        c = todo.pop()
        seen.append(c)
        todo += c.__subclasses__()
    return [c for c in seen if c.__module__.startswith("qbdl.data.")]


def test_subclasses_state_only_what_differs() -> None:
    classes = _datamodule_classes()
    assert len(classes) >= 10  # base, digits, torchvision + 4, colorectal, camelyon17, imagenet
    for cls in classes[1:]:
        parent = cls.__mro__[1]
        for k in SHARED_SETTINGS:
            if k in vars(cls):
                assert _plain(vars(cls)[k]) != _plain(getattr(parent, k)), (
                    f"{cls.__name__}.{k} restates {parent.__name__}'s default"
                )
        params = inspect.signature(cls.__init__).parameters
        assert not set(params) & set(SHARED_SETTINGS[1:]), (
            f"{cls.__name__}.__init__ redeclares shared settings"
        )
        if "__init__" in vars(cls):  # own parameters only, each a new one (not one of the parent's)
            own = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
            inherited = inspect.signature(parent.__init__).parameters
            assert not set(own) & set(inherited), cls.__name__


def test_digits_yaml_instantiates_and_runs() -> None:
    cfg = OmegaConf.load(CONF / "digits.yaml")
    dm = instantiate(cfg)
    assert isinstance(dm, DigitsDataModule)
    dm.setup()
    assert dm.spec.mean == (0.3053,) and next(iter(dm.test_dataloader()))[0].shape[1:] == (1, 16, 16)


def test_stratified_split_partition_and_seed() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    parts = stratified_split(labels, {"a": 0.5, "b": 0.2, "c": 0.3}, seed=0)
    allidx = np.concatenate(list(parts.values()))
    assert sorted(allidx.tolist()) == list(range(100))
    assert np.bincount(labels[parts["a"]]).tolist() == [5, 10, 15, 20]
    again = stratified_split(labels, {"a": 0.5, "b": 0.2, "c": 0.3}, seed=0)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(
        parts["a"], stratified_split(labels, {"a": 0.5, "b": 0.2, "c": 0.3}, seed=1)["a"]
    )
    with pytest.raises(ValueError):
        stratified_split(labels, {"a": 0.9, "b": 0.3}, seed=0)
    sub = seeded_subset(np.arange(50), 10, 3)
    assert len(sub) == 10 and np.array_equal(sub, seeded_subset(np.arange(50), 10, 3))


def test_spec_transform_channels_size_norm() -> None:
    from PIL import Image

    img = Image.fromarray(np.full((30, 60, 3), 255, dtype=np.uint8))
    x = SpecTransform(ImageSpec(16, 1, (0.5,), (0.5,)))(img)
    assert x.shape == (1, 16, 16) and torch.allclose(x, torch.ones_like(x), atol=1e-3)
    g = torch.rand(1, 5, 5)
    assert torch.equal(match_channels(g, 3)[2], g[0])
    rgba = torch.rand(4, 5, 5)
    assert match_channels(rgba, 3).shape == (3, 5, 5)
    with pytest.raises(ValueError):
        ImageSpec(32, 3, (0.5,), (0.5,))


def test_check_no_leak_detects_renormalised_and_resized_copies() -> None:
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(20, 3, 24, 24, generator=g)
    test = TransformSubset(torch.utils.data.TensorDataset(imgs, torch.zeros(20, dtype=torch.long)), range(20))
    # the same images as an "OOD" set, differently normalised and resized: still caught
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.3, 0.25]).view(3, 1, 1)
    leak = [(torch.nn.functional.interpolate(((x - mean) / std)[None], size=48)[0], -1) for x in imgs[5:9]]
    with pytest.raises(DataLeakError, match="shares 4"):
        check_no_leak(test, leak)
    other = [(torch.rand(3, 24, 24, generator=g), -1) for _ in range(20)]
    check_no_leak(test, other)
    flat = [(torch.zeros(3, 24, 24), -1)]
    assert fingerprint(flat) == {}  # blank images are not fingerprinted (they would all collide)


@pytest.mark.parametrize("name", NAMES[1:])
def test_yaml_instantiates_with_root_override(name: str, tmp_path: Path) -> None:
    from fabricate import make_camelyon17, make_colorectal, make_imagenet, make_mnist

    makers = {"imagenet": make_imagenet, "colorectal": make_colorectal, "camelyon17": make_camelyon17}
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    root = makers.get(name, make_mnist)(tmp_path)
    cfg.root, cfg.num_workers = str(root), 0
    dm = instantiate(cfg)
    assert type(dm).__name__ == cfg._target_.rsplit(".", 1)[1] and dm.root == root
    if name in ("colorectal", "camelyon17", "mnist"):
        dm.setup()
        assert len(dm.dataset("train")) > 0 and dm.spec.in_chans in (1, 3)
