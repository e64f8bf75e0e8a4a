"""scikit-learn's digits (embedded, no download) with photo-patch and rotated-digit OOD sets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, load_sample_images
from torch.utils.data import Dataset, TensorDataset

from qbdl.data.module import CLASS_DEFAULT, DataSettings, ImageDataModule
from qbdl.data.splits import TransformSubset, check_labels, stratified_split

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

DIGITS_MAX = 16.0  # load_digits pixel values are integers 0..16


def photo_patches(min_levels: int = 10, patch: int = 8) -> np.ndarray:
    """Non-overlapping gray patches of sklearn's sample photos, quantised to 0..16, with >= min_levels levels."""
    out = []
    for img in load_sample_images().images:  # china.jpg, flower.jpg, uint8 RGB
        gray = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        q = np.rint(gray / 255.0 * DIGITS_MAX)
        h, w = (q.shape[0] // patch) * patch, (q.shape[1] // patch) * patch
        tiles = (
            q[:h, :w].reshape(h // patch, patch, w // patch, patch).swapaxes(1, 2).reshape(-1, patch, patch)
        )
        levels = np.array([len(np.unique(t)) for t in tiles])
        out.append(tiles[levels >= min_levels])  # textured patches only: flat sky is not "far OOD"
    return np.concatenate(out).astype(np.float32)


class _Augment:
    """Random shifts (in output pixels) of an already upsampled digit; flips would change the class."""

    def __init__(self, max_shift: int) -> None:
        self.max_shift = max_shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_shift <= 0:
            return x
        dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


class DigitsDataModule(ImageDataModule):
    """sklearn digits (1,797 real 8x8 images, 10 classes) upsampled to ``image_size``, 1 channel."""

    name = "digits"
    in_chans = 1
    num_classes = 10
    class_names = tuple(str(i) for i in range(10))
    num_workers = 0
    image_size = 16
    mean = (0.3053,)
    std = (0.3760,)
    augment = False

    def __init__(
        self,
        root: str | Path | None = CLASS_DEFAULT,
        *,
        train_fraction: float = 0.6,
        val_fraction: float = 0.12,
        test_fraction: float = 0.28,
        augment_shift: int = 1,
        n_photos: int | None = 256,
        photo_min_levels: int = 10,
        **settings: Unpack[DataSettings],
    ) -> None:
        super().__init__(root, **settings)
        total = train_fraction + val_fraction + test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"digits: train/val/test fractions must sum to 1, got {total}")
        self.fractions = {
            "train": float(train_fraction),
            "val": float(val_fraction),
            "test": float(test_fraction),
        }
        self.augment_shift = int(augment_shift)
        self.n_photos = n_photos
        self.photo_min_levels = int(photo_min_levels)
        self._ood: dict[str, Dataset] = {}

    def transform_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Raw 0..16 digits [N, 8, 8] or [N, 1, 8, 8] -> normalised [N, 1, S, S] (bilinear upsampling)."""
        x = x.float().reshape(-1, 1, x.shape[-2], x.shape[-1]) / DIGITS_MAX
        if x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        mean = torch.tensor(self.spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def _setup(self) -> None:
        d = load_digits()
        images = torch.from_numpy(d.images.astype(np.float32))  # [1797, 8, 8], 0..16
        labels = torch.from_numpy(d.target.astype(np.int64))
        check_labels(labels, self.num_classes, "digits")
        self.images_raw, self.labels = images, labels
        parts = stratified_split(labels.numpy(), self.fractions, self.seed)
        self._split_idx = {k: v.tolist() for k, v in parts.items()}
        # everything fits in memory: transform once
        full = TensorDataset(self.transform_raw(images), labels)
        raw = TensorDataset(images.unsqueeze(1) / DIGITS_MAX, labels)  # [0, 1] for as_ood
        # augment_shift is in source (8x8) pixels; scale it to the upsampled size
        aug = _Augment(self.augment_shift * self.image_size // 8) if self.augment else None
        self._datasets = {
            "train": TransformSubset(full, self._split_idx["train"], aug),
            "val": TransformSubset(full, self._split_idx["val"]),
            "test": TransformSubset(full, self._split_idx["test"]),
        }
        self._calib = TransformSubset(full, self._split_idx["train"])
        self._raw = {k: TransformSubset(raw, v) for k, v in self._split_idx.items()}

    def shift_source(self) -> tuple[Dataset, list[int]]:
        """Raw test digits ([1, 8, 8] in [0, 1]) and their indices into load_digits()."""
        self._need()
        return self._raw["test"], list(self._split_idx["test"])

    def shift_preprocess(self, item: torch.Tensor) -> torch.Tensor:
        """[1, 8, 8] in [0, 1] -> [1, S, S] by the bilinear upsampling of ``transform_raw``, not normalised."""
        x = torch.as_tensor(item).float().reshape(1, 1, item.shape[-2], item.shape[-1])
        if x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return x[0]

    def ood_raw(self) -> dict[str, torch.Tensor]:
        """Untransformed OOD images on the digits' 0..16 scale: 'photos' [n, 8, 8], 'rotated' [n_test, 8, 8]."""
        self._need()
        patches = photo_patches(self.photo_min_levels)
        test_idx = torch.tensor(self._split_idx["test"])
        n = len(test_idx) if self.n_photos is None else int(self.n_photos)
        if n > len(patches):
            raise ValueError(f"digits: n_photos={n} but only {len(patches)} textured photo patches exist")
        rng = np.random.default_rng(self.seed)
        photos = torch.from_numpy(patches[np.sort(rng.choice(len(patches), size=n, replace=False))])
        rotated = torch.rot90(self.images_raw[test_idx], k=1, dims=(-2, -1))
        return {"photos": photos, "rotated": rotated}

    def ood_datasets(self) -> dict[str, Dataset]:
        """'photos' (far OOD: textured photo patches) and 'rotated' (near OOD: test digits rotated 90 deg)."""
        if not self._ood:
            for k, v in self.ood_raw().items():
                self._ood[k] = TensorDataset(
                    self.transform_raw(v), torch.full((len(v),), -1, dtype=torch.long)
                )
        return dict(self._ood)
