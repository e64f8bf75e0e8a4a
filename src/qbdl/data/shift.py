"""Data drift: any datamodule's test split under a corruption (qbdl.data.corruptions), and the shift config.

Images are rendered on the fly per item, or once into memory and into a cache file
(``<cache_dir>/<corruption>/<severity>.pt``, plain tensors with a SHA-256 of the pixels) that a
resumed run re-uses; a cache file that does not match is reported and re-rendered, never used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qbdl.data.corruptions import CORRUPTIONS, MNIST_C, SEVERITIES, corrupt_image, corruption_names, item_seed

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the rendering changes, so stale cache files are re-rendered


# --------------------------------------------------------------------------------------------- datasets


def to_uint8_hwc(x: torch.Tensor) -> np.ndarray:
    """Float [C, H, W] in [0, 1] -> uint8 [H, W, C] (rounded)."""
    return (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()


class _Render(Dataset):
    """(uint8 [C, S, S] corrupted image, label) of test item ``i``; used lazily and to fill the cache."""

    def __init__(
        self,
        raw: Dataset,
        ids: Sequence[int],
        preprocess: Callable[[Any], torch.Tensor],
        corruption: str,
        severity: int,
        seed: int,
    ) -> None:
        self.raw, self.ids, self.preprocess = raw, [int(i) for i in ids], preprocess
        self.corruption, self.severity, self.seed = corruption, int(severity), int(seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item, y = self.raw[i]
        u8 = to_uint8_hwc(self.preprocess(item))
        s = item_seed(self.seed, self.corruption, self.severity, self.ids[i])
        out = corrupt_image(u8, self.corruption, self.severity, s)
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous(), int(y)


class ShiftedDataset(Dataset):
    """A corrupted test split: items (normalised image tensor [C, S, S], label).

    Either rendered per item on access (``images`` None) or held as a uint8 tensor [N, C, S, S]
    rendered once (and possibly loaded from / saved to the cache).
    """

    def __init__(
        self,
        render: _Render,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        self.render = render
        self.normalize = normalize
        self.images = images
        self.labels = labels
        self.corruption, self.severity, self.seed = render.corruption, render.severity, render.seed
        self.ids = list(render.ids)

    def __len__(self) -> int:
        return len(self.render)

    def uint8(self, i: int) -> tuple[torch.Tensor, int]:
        """The corrupted image before normalisation (uint8 [C, S, S]) and its label."""
        if self.images is not None:
            assert self.labels is not None
            return self.images[i], int(self.labels[i])
        return self.render[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        u8, y = self.uint8(i)
        return self.normalize(u8.float().div(255.0)), y


def render_all(
    render: _Render, num_workers: int = 0, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of ``render`` as (uint8 [N, C, S, S], int64 labels [N]); workers render in parallel."""
    if len(render) == 0:
        raise ValueError("cannot render an empty test split")
    loader = DataLoader(render, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys)


def _digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], corruption: str, severity: int) -> Path:
    """``<cache_dir>/<corruption>/<severity>.pt``."""
    return Path(cache_dir) / corruption / f"{int(severity)}.pt"


def _meta(render: _Render, datamodule_name: str, image_size: int, channels: int) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "datamodule": datamodule_name,
        "corruption": render.corruption,
        "severity": render.severity,
        "seed": render.seed,
        "image_size": int(image_size),
        "channels": int(channels),
    }


def save_cache(
    path: Path, images: torch.Tensor, labels: torch.Tensor, ids: Sequence[int], meta: dict
) -> None:
    """Write plain tensors + meta (with a SHA-256 of the pixels) atomically: temp file, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "images": images.contiguous(),
        "labels": labels.to(torch.int64).contiguous(),
        "ids": torch.as_tensor(list(ids), dtype=torch.int64),
        "meta": {**meta, "sha256": _digest(images, labels)},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_cache(path: Path, ids: Sequence[int], meta: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) from a cache file that matches ``ids`` and ``meta``; None (with a warning) otherwise.

    A file that does not load, has the wrong shape, fails its checksum, or was rendered with other
    settings is reported and ignored (the caller re-renders and overwrites it), never silently used.
    """
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        images, labels, got_ids, got = d["images"], d["labels"], d["ids"], dict(d["meta"])
        problem = None
        want = {**meta}
        for k, v in want.items():
            if got.get(k) != v:
                problem = f"rendered with {k}={got.get(k)!r}, need {v!r}"
                break
        if problem is None and got_ids.tolist() != [int(i) for i in ids]:
            problem = "it holds other test items"
        if problem is None and (
            images.dtype != torch.uint8
            or images.ndim != 4
            or images.shape[0] != len(ids)
            or tuple(images.shape[1:]) != (meta["channels"], meta["image_size"], meta["image_size"])
            or labels.shape != (len(ids),)
        ):
            problem = f"unexpected shapes {tuple(images.shape)} / {tuple(labels.shape)}"
        if problem is None and got.get("sha256") != _digest(images, labels):
            problem = "its checksum does not match its pixels (the file is corrupt)"
    except Exception as e:  # truncated zip, not a torch file, pickled objects, missing keys ...
        problem = f"it cannot be read ({type(e).__name__}: {e})"
    if problem is not None:
        msg = f"data shift cache {path} is not usable: {problem}; re-rendering it"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None
    return images, labels


def build_shifted(
    raw: Dataset,
    ids: Sequence[int],
    preprocess: Callable[[Any], torch.Tensor],
    normalize: Callable[[torch.Tensor], torch.Tensor],
    corruption: str,
    severity: int,
    seed: int,
    *,
    datamodule_name: str,
    image_size: int,
    channels: int,
    materialize: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int = 0,
) -> ShiftedDataset:
    """A :class:`ShiftedDataset` over ``raw`` (items (raw image, label), ids = their stable item ids).

    ``materialize`` renders every image once into memory (loading ``cache_dir``'s file when it is
    valid, writing it otherwise); without it images are rendered on each access.
    """
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTIONS)}")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of 1..5, got {severity!r}")
    render = _Render(raw, ids, preprocess, corruption, int(severity), int(seed))
    if not materialize and cache_dir is None:
        return ShiftedDataset(render, normalize)
    meta = _meta(render, datamodule_name, image_size, channels)
    path = cache_path(cache_dir, corruption, severity) if cache_dir is not None else None
    loaded = load_cache(path, render.ids, meta) if path is not None else None
    if loaded is None:
        images, labels = render_all(render, num_workers=num_workers)
        if path is not None:
            save_cache(path, images, labels, render.ids, meta)
    else:
        images, labels = loaded
    return ShiftedDataset(render, normalize, images, labels)


# --------------------------------------------------------------------------------------------- config


SHIFT_KEYS = ("corruptions", "severities", "seed", "root", "cache", "cache_dir", "max_items")


def _is_gray(datamodule: Any) -> bool:
    return int(datamodule.spec.in_chans) == 1


def validate_shift(cfg: Mapping[str, Any] | None, datamodule: Any) -> None:
    """Raise a one-paragraph ValueError for a shift config that cannot run on ``datamodule``.

    Checks: known keys; every corruption known (to the registry, or to the official set when
    ``root`` is set); severities in 1..5 (MNIST-C: 1 only); no RGB-only corruption on grayscale data.
    """
    if cfg is None:
        return
    from qbdl.data.shift_sets import official_names

    name = getattr(datamodule, "name", type(datamodule).__name__)
    problems: list[str] = []
    unknown_keys = sorted(set(cfg) - set(SHIFT_KEYS))
    if unknown_keys:
        problems.append(f"unknown key(s) {unknown_keys} (known: {', '.join(SHIFT_KEYS)})")
    corruptions = list(cfg.get("corruptions") or [])
    severities = list(cfg.get("severities") or [])
    root = cfg.get("root")
    if corruptions and not severities:
        problems.append("severities is empty (use e.g. [1, 2, 3, 4, 5])")
    if root is not None:
        valid = official_names(name)
        if valid is None:
            problems.append(
                f"shift.root is set but the '{name}' data has no official pre-rendered corruption set "
                "(readers exist for imagenet -> ImageNet-C, cifar10 -> CIFAR-10-C, mnist -> MNIST-C); "
                "set shift.root=null to render the corruptions on the fly"
            )
            valid = list(CORRUPTIONS)
    else:
        valid = corruption_names(rgb=not _is_gray(datamodule))
    bad = [c for c in corruptions if not isinstance(c, str) or c not in CORRUPTIONS and c not in valid]
    if bad:
        problems.append(f"unknown corruption(s) {bad}; valid names: {', '.join(valid)}")
    if root is None and _is_gray(datamodule):
        rgb_only = [
            c for c in corruptions if isinstance(c, str) and c in CORRUPTIONS and CORRUPTIONS[c].rgb_only
        ]
        if rgb_only:
            problems.append(
                f"corruption(s) {rgb_only} need RGB images but '{name}' is grayscale; for grayscale data "
                f"use e.g. the MNIST-C list (shift=mnist_c): {', '.join(MNIST_C)}"
            )
    elif root is not None:
        not_there = [c for c in corruptions if isinstance(c, str) and c in CORRUPTIONS and c not in valid]
        if not_there:
            problems.append(
                f"corruption(s) {not_there} are not in the official set; it has: {', '.join(valid)}"
            )
    bad_sev = [s for s in severities if isinstance(s, bool) or not isinstance(s, int) or s not in SEVERITIES]
    if bad_sev:
        problems.append(f"severities {bad_sev} are outside 1..5 (integers)")
    if root is not None and name == "mnist" and any(s != 1 for s in severities if s not in bad_sev):
        problems.append("MNIST-C has a single severity: set shift.severities=[1] when shift.root is set")
    mi = cfg.get("max_items")
    if mi is not None and (isinstance(mi, bool) or not isinstance(mi, int) or mi < 1):
        problems.append(f"max_items must be null or a positive integer, got {mi!r}")
    if problems:
        raise ValueError(f"Invalid data-shift config (shift) for data '{name}': " + "; ".join(problems) + ".")


def shift_datasets(
    datamodule: Any,  # an ImageDataModule (qbdl.data.module imports this module)
    cfg: Mapping[str, Any] | None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[tuple[str, int, Dataset]]:
    """(corruption, severity, Dataset) for every pair of a shift config, in config order.

    ``cfg.root`` set: the official pre-rendered set is read (ImageNet-C, CIFAR-10-C, MNIST-C).
    Otherwise images are rendered on the fly from the test split; with ``cfg.cache`` each set is
    rendered once into memory, and also saved under ``cfg.cache_dir`` (or the ``cache_dir``
    argument, e.g. the run directory, when that is null) so a resumed run does not re-render.
    """
    if cfg is None:
        return []
    validate_shift(cfg, datamodule)
    out: list[tuple[str, int, Dataset]] = []
    seed = int(cfg.get("seed") or 0)
    root = cfg.get("root")
    cache = bool(cfg.get("cache", True))
    cdir = cfg.get("cache_dir") or cache_dir
    for c in cfg.get("corruptions") or []:
        for s in cfg.get("severities") or []:
            if root is not None:
                ds = datamodule.shift_reader(root, str(c), int(s))
            else:
                ds = datamodule.shift_dataset(
                    str(c),
                    int(s),
                    seed,
                    cache=cache,
                    cache_dir=cdir if cache else None,
                    max_items=cfg.get("max_items"),
                )
            out.append((str(c), int(s), ds))
    return out
