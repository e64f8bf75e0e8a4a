"""On-disk image sources (files, zip members) and their up-front verification (unreadable files)."""

from __future__ import annotations

import io
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from qbdl.data.errors import BadImageError

log = logging.getLogger(__name__)


class ImageSource(Dataset):
    """Raw (PIL image, label) items of an on-disk data set, addressable by a global index."""

    labels: np.ndarray

    def open(self, i: int) -> Image.Image:  # pragma: no cover - interface
        """Open item ``i`` as a PIL image (not yet decoded)."""
        raise NotImplementedError

    def describe(self, i: int) -> str:  # pragma: no cover - interface
        """A path-like name of item ``i`` for error messages and ``bad_files``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            img = self.open(i)
            img.load()
        except Exception as e:  # a file that went bad after setup's verification (or verify=false / header)
            raise BadImageError(
                f"cannot read image {self.describe(i)} ({type(e).__name__}: {e}): the file is corrupt or "
                "truncated. Delete or re-download it, or set the data module's verify=true to decode every image "
                "at setup (bad files then skipped or refused, as on_bad_file says) before any training"
            ) from e
        return img, int(self.labels[i])


class FileSource(ImageSource):
    """Images stored as individual files."""

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int]) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def open(self, i: int) -> Image.Image:
        """Open the file of item ``i``."""
        return Image.open(self.paths[i])

    def describe(self, i: int) -> str:
        """The file path of item ``i``."""
        return self.paths[i]


class ZipSource(ImageSource):
    """Images read straight from members of a zip archive (no extraction)."""

    def __init__(self, zip_path: str | Path, members: Sequence[str], labels: Sequence[int]) -> None:
        self.zip_path = str(zip_path)
        self.members = list(members)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._zf: zipfile.ZipFile | None = None
        self._pid = -1

    def _zip(self) -> zipfile.ZipFile:
        # One handle per process: a ZipFile shared across forked DataLoader workers would interleave seeks.
        if self._zf is None or self._pid != os.getpid():
            self._zf = zipfile.ZipFile(self.zip_path)
            self._pid = os.getpid()
        return self._zf

    def open(self, i: int) -> Image.Image:
        """Read member ``i`` into memory and open it."""
        return Image.open(io.BytesIO(self._zip().read(self.members[i])))

    def describe(self, i: int) -> str:
        """``archive.zip!member`` of item ``i``."""
        return f"{self.zip_path}!{self.members[i]}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zf"] = None  # ZipFile handles do not pickle (spawned workers)
        return state


# --------------------------------------------------------------------------------------------- verification


def image_problem(opener: Callable[[], Image.Image], full: bool = True) -> str | None:
    """Why an image cannot be used (None if it decodes fully; with full=False, if its header reads)."""
    if not full:  # the header only (format, size): ~50 us a file, finds files that are not images at all
        try:
            with opener() as img:
                return "empty image" if img.width < 1 or img.height < 1 else None
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # PIL warns (e.g. "Truncated File Read") before failing; we report instead
        try:
            with opener() as img:
                img.verify()  # header/CRC checks
            with opener() as img:
                img.load()  # full decode: catches truncated data that verify() misses
                if img.width < 1 or img.height < 1:
                    return "empty image"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
    return None


def verify_source(
    source: ImageSource, indices: Sequence[int] | np.ndarray, on_bad_file: str, name: str, full: bool = True
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode every image in ``indices`` (headers only if not `full`); return good indices and (path, reason) of bad ones."""
    if on_bad_file not in ("skip", "error"):
        raise ValueError(f"on_bad_file must be 'skip' or 'error', got {on_bad_file!r}")
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    for i in np.asarray(indices, dtype=np.int64).tolist():
        reason = image_problem(lambda i=i: source.open(i), full)
        if reason is None:
            good.append(i)
        else:
            bad.append((source.describe(i), reason))
    if bad:
        listing = "; ".join(f"{p} ({r})" for p, r in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if on_bad_file == "error":
            raise BadImageError(
                f"{name}: {len(bad)} unreadable image file(s): {listing}. Re-download or delete them, "
                "or set on_bad_file=skip to exclude them (they are then listed in bad_files)."
            )
        log.warning("%s: excluding %d unreadable image file(s): %s", name, len(bad), listing)
    return np.asarray(good, dtype=np.int64), bad
