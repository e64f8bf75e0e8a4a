"""ImageNet-C-style corruptions of single images: the registry, the reference code and qbdl's own ones.

Why this implementation. The corruptions come from the PyPI package ``imagecorruptions`` (1.1.2,
Michaelis et al. 2019), which is Hendrycks & Dietterich's reference ImageNet-C code (ICLR 2019)
generalised to arbitrary image sizes, with the frost images inside the wheel. Using the reference
code keeps our severities comparable with the published ImageNet-C / CIFAR-10-C numbers; a
re-implementation would silently drift. The package is unmaintained since 2020, so four small
compatibility fixes are applied to *its own module namespace* (never to numpy or scikit-image):
``pkg_resources`` (removed from setuptools >= 81) is replaced by ``importlib.resources`` for the frost
files; ``np.float_`` (removed in numpy 2) resolves to ``np.float64``; scikit-image's ``gaussian``
lost ``multichannel=True`` (now ``channel_axis=-1``); and ``random_noise`` (impulse noise) draws
from a fresh unseeded Generator unless given one, so it gets an ``rng`` drawn from the seeded global
state. Everything else runs unchanged.

Determinism. Every image is corrupted under a seed derived from (seed, corruption, severity, item
id) with :func:`item_seed` (BLAKE2b, so not Python's salted ``hash``). imagecorruptions draws from
the *global* ``np.random``; :func:`corrupt_image` seeds it for the call and restores the previous
state afterwards (under a lock), so the caller's random stream is untouched.

Grayscale data (digits, MNIST, Fashion-MNIST) is repeated to 3 channels for a corruption and
averaged back to one. Corruptions that are meaningless without colour (``saturate``, ``stain``)
are ``rgb_only`` and refused for grayscale data by :func:`qbdl.data.shift.validate_shift`. The
MNIST-C geometric corruptions (rotate, shear, scale, translate) and ``stripe`` are small
deterministic functions here (Mu & Gilmer 2019 list them; their severities are our own, see
:data:`AFFINE_SEVERITY`).

Histology gets ``stain``: H&E colour jitter in HED space (Tellez et al. 2018/2019). Per image and
per channel c in (H, E, D): ``hed_c <- hed_c * (1 + a_c) + b_c`` with ``a_c ~ U(-alpha, alpha)`` and
``b_c ~ U(-beta, beta)``, hed = optical density (natural log) times scikit-image's ``hed_from_rgb``
stain matrix (the units of Tellez et al.), back through ``rgb_from_hed``; (alpha, beta) by severity
(:data:`STAIN_SEVERITY`): 1: (0.05, 0.02), 2: (0.10, 0.04), 3: (0.15, 0.07), 4: (0.20, 0.10),
5: (0.30, 0.15). Tellez's "HED-light" is alpha = beta = 0.05 (our 1-2), "HED-strong" 0.2 (our 4-5).

Measured cost per image (median ms) is in ``scripts/shift_cost.py``'s output; ``glass_blur`` and
``zoom_blur`` are flagged ``slow`` (pure-Python pixel loops / 10-30 zooms of the whole image).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

SEVERITIES = (1, 2, 3, 4, 5)


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Corruption:
    """One corruption: its family, whether it needs colour, whether it is slow, who implements it."""

    name: str
    family: str  # noise | blur | weather | digital | geometric | histology
    rgb_only: bool = False
    slow: bool = False
    source: str = "imagecorruptions"  # or "qbdl"
    random: bool = True  # False: the same image for every seed (a fixed filter)
    monotone: bool = True  # False: the change (mean |x' - x|) is not monotone in severity (as in ImageNet-C)


_C = Corruption
CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        # ImageNet-C's 15 (Hendrycks & Dietterich 2019), in their order
        _C("gaussian_noise", "noise"),
        _C("shot_noise", "noise"),
        _C("impulse_noise", "noise"),
        _C("defocus_blur", "blur", random=False),
        _C("glass_blur", "blur", slow=True, monotone=False),
        _C("motion_blur", "blur"),
        _C("zoom_blur", "blur", slow=True, random=False),
        _C("snow", "weather", monotone=False),
        _C("frost", "weather", monotone=False),
        _C("fog", "weather"),
        _C("brightness", "weather", random=False),
        _C("contrast", "digital", random=False),
        _C("elastic_transform", "digital"),
        _C("pixelate", "digital", random=False),
        _C("jpeg_compression", "digital", random=False),
        # ImageNet-C's 4 held-out ("validation") corruptions
        _C("speckle_noise", "noise"),
        _C("gaussian_blur", "blur", random=False),
        _C("spatter", "weather"),
        _C("saturate", "digital", rgb_only=True, random=False),  # HSV saturation: a gray image has none
        # MNIST-C's geometric ones and stripe (qbdl's own, deterministic)
        _C("rotate", "geometric", source="qbdl"),
        _C("shear", "geometric", source="qbdl"),
        _C("scale", "geometric", source="qbdl", random=False),
        _C("translate", "geometric", source="qbdl"),
        _C("stripe", "geometric", source="qbdl"),
        # histology
        _C("stain", "histology", rgb_only=True, source="qbdl"),
    )
}
del _C

IMAGENET_C = tuple(list(CORRUPTIONS)[:15])
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
# MNIST-C (Mu & Gilmer 2019) minus dotted_line, zigzag and canny_edges (not implemented here)
MNIST_C = (
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "scale",
    "rotate",
    "brightness",
    "translate",
    "stripe",
    "fog",
    "spatter",
)
# The names the official pre-rendered sets use (readers in qbdl.data.shift_sets)
MNIST_C_OFFICIAL = ("identity", *MNIST_C, "dotted_line", "zigzag", "canny_edges")
DEFAULT_LISTS: dict[str, tuple[str, ...]] = {
    "imagenet_c": IMAGENET_C,
    "mnist_c": MNIST_C,
    "digits": ("gaussian_noise", "motion_blur", "contrast", "rotate"),
    "histology": (
        "gaussian_noise",
        "defocus_blur",
        "motion_blur",
        "brightness",
        "contrast",
        "jpeg_compression",
        "pixelate",
        "stain",
    ),
}

# severity -> parameter of qbdl's own corruptions (half-widths of the uniform draws)
AFFINE_SEVERITY: dict[str, tuple[float, ...]] = {
    "rotate": (8.0, 16.0, 24.0, 32.0, 40.0),  # degrees, random sign
    "shear": (0.1, 0.2, 0.3, 0.4, 0.5),  # x-shear factor, random sign
    "scale": (0.9, 0.8, 0.7, 0.6, 0.5),  # zoom-out factor about the centre
    "translate": (0.06, 0.12, 0.18, 0.24, 0.30),  # shift in image widths, random direction
    "stripe": (0.06, 0.12, 0.18, 0.24, 0.30),  # width of an inverted vertical band, in image widths
}
STAIN_SEVERITY: tuple[tuple[float, float], ...] = (  # (alpha, beta); beta in optical density (ln)
    (0.05, 0.02),
    (0.10, 0.04),
    (0.15, 0.07),
    (0.20, 0.10),
    (0.30, 0.15),
)


def corruption_names(rgb: bool = True) -> list[str]:
    """Every known corruption (those usable on grayscale data when ``rgb`` is False), registry order."""
    return [n for n, c in CORRUPTIONS.items() if rgb or not c.rgb_only]


# --------------------------------------------------------------------------------------------- imagecorruptions


class _NumpyCompat(types.ModuleType):
    """numpy as imagecorruptions 1.1.2 expects it: ``np.float_`` exists (removed in numpy 2)."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _gaussian_compat(gaussian: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(image: Any, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> Any:
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return gaussian(image, *args, **kwargs)

    return wrapped


class _SkimageCompat(types.ModuleType):
    """skimage whose ``util.random_noise`` draws its Generator seed from the (seeded) global np.random."""

    def __init__(self, sk: Any) -> None:
        super().__init__("skimage")
        self._sk = sk
        noise = sk.util.random_noise

        def random_noise(image: Any, mode: str = "gaussian", **kwargs: Any) -> Any:
            kwargs.setdefault("rng", int(np.random.randint(0, 2**31 - 1)))
            return noise(image, mode=mode, **kwargs)

        self.util = types.SimpleNamespace(random_noise=random_noise)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sk, name)


_IC: Any = None
_IC_LOCK = threading.Lock()
_RNG_LOCK = threading.RLock()


def _resource_filename(module: str, path: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    return os.path.normpath(os.path.join(os.path.dirname(spec.origin), path))


def imagecorruptions_module() -> Any:
    """``imagecorruptions.corruptions`` with the compatibility fixes of the module docstring applied."""
    global _IC
    with _IC_LOCK:
        if _IC is not None:
            return _IC
        added: list[str] = []
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = _resource_filename  # type: ignore[attr-defined]
            sys.modules["pkg_resources"] = shim
            added.append("pkg_resources")
        if importlib.util.find_spec("scipy.ndimage.interpolation") is None:  # gone in SciPy 2
            import scipy.ndimage

            sys.modules["scipy.ndimage.interpolation"] = scipy.ndimage
            added.append("scipy.ndimage.interpolation")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    mod = importlib.import_module("imagecorruptions.corruptions")
                except ImportError as e:
                    raise ImportError(
                        f"data shift needs the package imagecorruptions (and scikit-image, opencv): {e}. "
                        "Install it with `pip install imagecorruptions==1.1.2 scikit-image` (it is in qbdl's "
                        "dependencies, so `pip install -e .` does it)."
                    ) from e
        finally:
            for name in added:  # the shims stay bound inside imagecorruptions, nowhere else
                sys.modules.pop(name, None)
        mod.np = _NumpyCompat("numpy")
        mod.gaussian = _gaussian_compat(mod.gaussian)
        mod.sk = _SkimageCompat(mod.sk)
        _IC = mod
        return mod


# --------------------------------------------------------------------------------------------- qbdl's own


def _affine(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x2 ``matrix`` about the image centre to float [H, W, C] (bilinear, zero outside)."""
    from scipy.ndimage import affine_transform

    h, w = x.shape[:2]
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    inv = np.linalg.inv(matrix)  # affine_transform maps output coords to input coords
    offset = centre - inv @ centre
    return np.stack(
        [
            affine_transform(x[..., c], inv, offset=offset, order=1, mode="constant")
            for c in range(x.shape[2])
        ],
        axis=-1,
    )


def _geometric(x: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """rotate / shear / scale / translate / stripe of float [H, W, 3] in 0..255 (row, col coordinates)."""
    p = AFFINE_SEVERITY[name][severity - 1]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    h, w = x.shape[:2]
    if name == "rotate":
        a = np.deg2rad(sign * p * rng.uniform(0.8, 1.0))
        return _affine(x, np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))
    if name == "shear":
        return _affine(x, np.array([[1.0, 0.0], [sign * p * rng.uniform(0.8, 1.0), 1.0]]))
    if name == "scale":
        return _affine(x, np.eye(2) * p)
    if name == "translate":
        from scipy.ndimage import shift as nd_shift

        ang = rng.uniform(0, 2 * np.pi)
        d = p * max(h, w)
        return nd_shift(x, (d * np.sin(ang), d * np.cos(ang), 0), order=1, mode="constant")
    if name == "stripe":
        width = max(1, int(round(p * w)))
        left = int(rng.integers(0, w - width + 1))
        out = x.copy()
        out[:, left : left + width] = 255.0 - out[:, left : left + width]
        return out
    raise KeyError(name)


def _stain(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """H&E colour jitter in HED space of uint8-range float [H, W, 3] (magnitudes: STAIN_SEVERITY).

    Uses scikit-image's H&E-DAB stain matrices on optical densities directly: ``rgb2hed`` itself clips
    negative stain amounts to 0 (skimage >= 0.19), so its round trip is not the identity (mean error
    0.12 on a photo, which would change every image even at zero jitter).
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    alpha, beta = STAIN_SEVERITY[severity - 1]
    od = -np.log(np.maximum(x, 1.0) / 255.0)  # optical density per RGB channel, >= 0
    hed = od @ hed_from_rgb
    a = rng.uniform(-alpha, alpha, size=3)
    b = rng.uniform(-beta, beta, size=3)
    hed = hed * (1.0 + a) + b
    return np.clip(np.exp(-(hed @ rgb_from_hed)), 0.0, 1.0) * 255.0


def item_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """A 32-bit seed from (seed, corruption, severity, item id), stable across processes and runs."""
    key = f"{int(seed)}|{corruption}|{int(severity)}|{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


@contextlib.contextmanager
def seeded_global_numpy(seed: int) -> Iterator[None]:
    """Seed the global ``np.random`` for a block and restore its previous state afterwards."""
    with _RNG_LOCK:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """Corrupt a uint8 image [H, W], [H, W, 1] or [H, W, 3]; same shape and dtype back, deterministic in ``seed``.

    Grayscale is repeated to 3 channels for the corruption and averaged back. ``seed`` is the item's
    seed (see :func:`item_seed`); the global numpy RNG is restored afterwards.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTIONS)}")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of 1..5, got {severity!r}")
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise TypeError(f"corrupt_image needs a uint8 image, got {img.dtype}")
    shape = img.shape
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"corrupt_image needs [H, W], [H, W, 1] or [H, W, 3], got {shape}")
    gray = img.shape[2] == 1
    if gray and CORRUPTIONS[corruption].rgb_only:
        raise ValueError(f"corruption {corruption!r} needs RGB images; this one is grayscale")
    rgb = np.repeat(img, 3, axis=2) if gray else img
    info = CORRUPTIONS[corruption]
    severity = int(severity)
    if info.source == "imagecorruptions":
        from PIL import Image

        fn = getattr(imagecorruptions_module(), corruption)
        with seeded_global_numpy(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = np.asarray(fn(Image.fromarray(rgb), severity), dtype=np.float64)
    else:
        rng = np.random.default_rng(seed)
        x = rgb.astype(np.float64)
        out = _stain(x, severity, rng) if corruption == "stain" else _geometric(x, corruption, severity, rng)
    if out.shape[:2] != rgb.shape[:2]:  # never seen, but a silent shape change would corrupt a batch
        raise RuntimeError(f"{corruption} changed the image size {rgb.shape[:2]} -> {out.shape[:2]}")
    if out.ndim == 2:
        out = out[..., None].repeat(3, axis=2)
    bad = ~np.isfinite(out)
    if bad.any():
        # spatter normalises its water layer by its maximum: an empty layer (small images) gives 0/0,
        # which means "no water here", i.e. the clean pixel
        out = np.where(bad, rgb.astype(np.float64), out)
    out = np.clip(out, 0, 255)
    if gray:
        out = out.mean(axis=2, keepdims=True)
    # the reference code truncates (np.uint8(...)); rounding keeps an unchanged gray image unchanged
    res = np.rint(out).astype(np.uint8) if gray else out.astype(np.uint8)
    return res.reshape(shape)
