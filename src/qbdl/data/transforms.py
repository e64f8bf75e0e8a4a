"""How images look to a model: ImageSpec and the raw-image -> tensor conversions that match one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, the weights PIL uses for convert("L"), so tensor and PIL gray conversions agree.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageSpec:
    """How in-distribution images look after the eval transform."""

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"ImageSpec: mean {self.mean} and std {self.std} need one value per channel (in_chans={self.in_chans})"
            )


def as_float_tuple(values: Sequence[float] | float) -> tuple[float, ...]:
    """Config lists (ListConfig, list, tuple or a scalar) as a tuple of floats."""
    if isinstance(values, (int, float)):
        return (float(values),)
    return tuple(float(v) for v in values)


def to_float_image(img: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
    """PIL image / uint8 array / tensor as a float tensor [C, H, W] in [0, 1]."""
    if isinstance(img, Image.Image):
        if img.mode not in ("L", "RGB"):
            # RGBA, palette, CMYK, 16-bit: RGB is the common denominator; alpha is dropped
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
        t = torch.from_numpy(arr.copy())
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        return t.float().div_(255.0)
    t = torch.as_tensor(img)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    return t.float().div(255.0) if t.dtype == torch.uint8 else t.float()


def match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Convert [C, H, W] to ``in_chans`` channels: gray->RGB by repetition, RGB->gray by luma weights."""
    c = x.shape[0]
    if c == in_chans:
        return x
    if c == 4:
        x, c = x[:3], 3
        if in_chans == 3:
            return x
    if c == 1:
        return x.expand(in_chans, -1, -1).clone()
    if c == 3 and in_chans == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)
        return (x * w).sum(0, keepdim=True)
    raise ValueError(f"cannot convert a {c}-channel image to {in_chans} channels")


def resize_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bilinear, antialiased) and centre-crop to ``size`` x ``size``."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(
            x.unsqueeze(0), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        )[0]
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[:, top : top + size, left : left + size]
    return x


class SpecGeometry:
    """Raw image -> float [C, S, S] in [0, 1] matching an ImageSpec's channels and size (no normalisation)."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        return resize_center(match_channels(to_float_image(img), self.spec.in_chans), self.spec.image_size)


class SpecTransform:
    """Raw image -> tensor that matches an ImageSpec (channels, size, normalisation)."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec = spec
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        x = match_channels(to_float_image(img), self.spec.in_chans)
        x = resize_center(x, self.spec.image_size)
        return (x - self.mean) / self.std
