"""Every data-shift corruption: deterministic per seed, and a change that grows with severity.

Images: a real photo (scikit-learn's china.jpg) resized to each datamodule's size -- digits 16x16
gray, MNIST/CIFAR 32x32 gray/RGB, histology 224x224 RGB (the slow ones only at 32). The change is
the mean absolute pixel difference, averaged over two seeds. Tolerance: monotone corruptions may
drop by at most 1 gray level from one severity to the next (pixelate saturates at 4-5 on small
images); those marked ``monotone=False`` (glass_blur, snow, frost: as in the reference ImageNet-C
parameters) by at most 25 %, and severity 5 must still change the image more than severity 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from qbdl.data.corruptions import (
    CORRUPTIONS,
    DEFAULT_LISTS,
    IMAGENET_C,
    MNIST_C,
    corrupt_image,
    corruption_names,
    item_seed,
)

_PHOTO = load_sample_images().images[0]


def _image(size: int, gray: bool) -> np.ndarray:
    im = Image.fromarray(_PHOTO).resize((size, size), Image.BILINEAR)
    return np.asarray(im.convert("L"))[..., None] if gray else np.asarray(im)


CASES = [(16, True), (32, True), (32, False), (224, False)]


def _params():
    for size, gray in CASES:
        for name, c in CORRUPTIONS.items():
            if gray and c.rgb_only:
                continue
            if size == 224 and c.slow:
                continue
            yield pytest.param(name, size, gray, id=f"{name}-{size}-{'gray' if gray else 'rgb'}")


@pytest.mark.parametrize(("name", "size", "gray"), list(_params()))
def test_corruption_deterministic_and_grows_with_severity(name: str, size: int, gray: bool) -> None:
    x = _image(size, gray)
    x_before = x.copy()
    info = CORRUPTIONS[name]
    a = corrupt_image(x, name, 3, item_seed(0, name, 3, 7))
    b = corrupt_image(x, name, 3, item_seed(0, name, 3, 7))
    assert a.dtype == np.uint8 and a.shape == x.shape
    assert a.tobytes() == b.tobytes()
    if info.random:
        c = corrupt_image(x, name, 3, item_seed(1, name, 3, 7))
        assert c.tobytes() != a.tobytes()
    np.testing.assert_array_equal(x, x_before)  # the input is never modified
    d = [
        np.mean([np.abs(corrupt_image(x, name, s, seed).astype(float) - x).mean() for seed in (11, 12)])
        for s in range(1, 6)
    ]
    assert d[0] > 0.2, f"{name} severity 1 leaves the image (almost) unchanged: {d}"
    for s in range(4):
        if info.monotone:
            assert d[s + 1] >= d[s] - 1.0, f"{name} change not monotone in severity: {np.round(d, 2)}"
        else:
            assert d[s + 1] >= 0.75 * d[s], f"{name} change drops > 25 %: {np.round(d, 2)}"
    assert d[4] > d[0], f"{name}: severity 5 changes less than severity 1: {np.round(d, 2)}"


def test_global_numpy_rng_is_restored_and_grayscale_2d_works() -> None:
    np.random.seed(123)
    expect = np.random.random(3)
    np.random.seed(123)
    corrupt_image(_image(32, False), "gaussian_noise", 2, 5)
    corrupt_image(_image(32, False), "impulse_noise", 2, 5)
    np.testing.assert_array_equal(np.random.random(3), expect)
    g2 = _image(16, True)[..., 0]
    out = corrupt_image(g2, "fog", 2, 3)
    assert out.shape == (16, 16) and out.dtype == np.uint8


def test_item_seed_is_stable_and_distinct() -> None:
    assert item_seed(0, "fog", 1, 0) == item_seed(0, "fog", 1, 0)
    seeds = {item_seed(s, c, v, i) for s in (0, 1) for c in ("fog", "snow") for v in (1, 2) for i in range(5)}
    assert len(seeds) == 40
    assert item_seed(0, "fog", 1, 0) == 2320058305  # BLAKE2b: same on every machine and Python


def test_registry_lists() -> None:
    assert len(IMAGENET_C) == 15 and all(n in CORRUPTIONS for n in IMAGENET_C)
    assert {n for n, c in CORRUPTIONS.items() if c.slow} == {"glass_blur", "zoom_blur"}
    assert {n for n, c in CORRUPTIONS.items() if c.rgb_only} == {"saturate", "stain"}
    assert not any(CORRUPTIONS[n].rgb_only for n in MNIST_C)
    assert not any(CORRUPTIONS[n].slow for n in DEFAULT_LISTS["digits"])
    assert "stain" in DEFAULT_LISTS["histology"]
    assert "saturate" not in corruption_names(rgb=False) and "saturate" in corruption_names()


def test_bad_arguments() -> None:
    x = _image(32, False)
    with pytest.raises(ValueError, match="unknown corruption 'nope'"):
        corrupt_image(x, "nope", 1, 0)
    with pytest.raises(ValueError, match="1..5"):
        corrupt_image(x, "fog", 6, 0)
    with pytest.raises(ValueError, match="needs RGB"):
        corrupt_image(_image(32, True), "stain", 1, 0)
    with pytest.raises(TypeError, match="uint8"):
        corrupt_image(x.astype(np.float32), "fog", 1, 0)
