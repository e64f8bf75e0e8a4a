"""Data-layer helpers and the conf/data yaml files (keys == constructor signature, instantiable)."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from qbdl.data import DigitsDataModule, ImageSpec, SpecTransform, check_no_leak, fingerprint, stratified_split
from qbdl.data.base import TransformSubset, match_channels, seeded_subset
from qbdl.data.errors import DataLeakError

CONF = Path(__file__).resolve().parents[1] / "src" / "qbdl" / "conf" / "data"
NAMES = ["digits", "imagenet", "colorectal", "camelyon17", "mnist", "fashion_mnist", "cifar10", "svhn"]


@pytest.mark.parametrize("name", NAMES)
def test_yaml_keys_match_signature_and_defaults(name: str) -> None:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cls = get_class(cfg._target_)
    params = inspect.signature(cls.__init__).parameters
    keys = set(cfg.keys()) - {"_target_"}
    assert keys == set(params) - {"self"}, f"{name}: yaml keys differ from {cls.__name__} arguments"
    assert "root" in keys
    for k in keys - {"root"}:  # the code's defaults are the yaml's values
        v = OmegaConf.to_container(cfg, resolve=False)[k]
        default = params[k].default
        if isinstance(v, (list, dict)):
            v = tuple(v) if isinstance(v, list) else v
            default = tuple(default) if isinstance(default, (list, tuple)) else default
        assert v == default, f"{name}.{k}: yaml {v!r} != code default {default!r}"


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
