"""Camelyon17-WILDS through the ``wilds`` package (official splits), in-distribution or as an OOD set."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from qbdl.data.colorectal import histology_transforms
from qbdl.data.errors import DataNotFoundError, not_found_message
from qbdl.data.module import CLASS_DEFAULT, DataSettings, ImageDataModule
from qbdl.data.sources import ImageSource, verify_source
from qbdl.data.splits import TransformSubset, check_labels, seeded_subset
from qbdl.data.transforms import ImageSpec, SpecTransform

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

WILDS_SPLITS = ("train", "id_val", "test", "val")  # val = hospital 1 (OOD validation), test = hospital 2
# which wilds split plays each role by default (read-only so it can be a signature default)
DEFAULT_ROLES: Mapping[str, str] = MappingProxyType({"train": "train", "val": "id_val", "test": "test"})
CAMELYON_DIR = "camelyon17_v1.0"
CAMELYON_LAYOUT = f"""
ROOT/
  {CAMELYON_DIR}/
    RELEASE_v1.0.txt
    metadata.csv      (index column + patient,node,x_coord,y_coord,tumor,slide,center,split)
    patches/patient_004_node_4/patch_patient_004_node_4_x_3328_y_21792.png ...  (96x96 RGB)
"""
CAMELYON_HOW = (
    "set `download: true` (wilds downloads ~10 GB from CodaLab), run "
    "`python scripts/download_data.py camelyon17 --root ROOT`, or download it manually from "
    "https://wilds.stanford.edu/downloads."
)


class WildsSource(ImageSource):
    """Items of a WILDS dataset; images are read with the dataset's own ``get_input``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.labels = np.asarray(dataset.y_array, dtype=np.int64)

    def path(self, i: int) -> str:
        """File path of item ``i`` (wilds keeps the relative paths in ``_input_array``)."""
        return os.path.join(self.dataset.data_dir, self.dataset._input_array[i])

    def open(self, i: int) -> Image.Image:
        """Open the patch file of item ``i``."""
        return Image.open(self.path(i))

    def describe(self, i: int) -> str:
        """The patch path of item ``i``."""
        return self.path(i)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            img = self.dataset.get_input(int(i))  # the real wilds reader (PIL, converted to RGB)
        except Exception as e:
            raise OSError(f"cannot read image {self.describe(i)}: {type(e).__name__}: {e}") from e
        return img, int(self.labels[i])


class Camelyon17DataModule(ImageDataModule):
    """Camelyon17-WILDS: 96x96 RGB lymph-node patches, 2 classes (tumor in the central 32x32 or not)."""

    name = "camelyon17"
    num_classes = 2
    class_names = ("normal", "tumor")
    root = "data/wilds"
    image_size = 96

    def __init__(
        self,
        root: str | Path | None = CLASS_DEFAULT,
        *,
        download: bool = False,
        split_scheme: str = "official",
        splits: Mapping[str, str] = DEFAULT_ROLES,
        max_train: int | None = None,
        max_val: int | None = None,
        max_test: int | None = None,
        verify: bool = True,
        on_bad_file: str = "skip",
        **settings: Unpack[DataSettings],
    ) -> None:
        super().__init__(root, **settings)
        self.download = bool(download)
        self.split_scheme = str(split_scheme)
        # which wilds split plays which role when Camelyon17 is the in-distribution data
        self.splits = dict(splits)
        if set(self.splits) != {"train", "val", "test"} or not set(self.splits.values()) <= set(WILDS_SPLITS):
            raise ValueError(f"camelyon17: splits maps train/val/test to {WILDS_SPLITS}, got {self.splits}")
        self.caps = {"train": max_train, "val": max_val, "test": max_test}
        self.verify = bool(verify)
        self.on_bad_file = str(on_bad_file)
        self.wilds_dataset: Any = None
        self._wilds_idx: dict[str, np.ndarray] = {}

    def _check_root(self) -> None:
        d = None if self.root is None else self.root / CAMELYON_DIR
        if d is None or not (d / "metadata.csv").is_file():
            raise DataNotFoundError(not_found_message("Camelyon17-WILDS", d, CAMELYON_LAYOUT, CAMELYON_HOW))
        if not (d / "RELEASE_v1.0.txt").is_file():
            # without it wilds would try to re-download the whole archive
            raise DataNotFoundError(
                not_found_message("Camelyon17-WILDS", d / "RELEASE_v1.0.txt", CAMELYON_LAYOUT, CAMELYON_HOW)
            )

    def _setup(self) -> None:
        if not self.download:
            self._check_root()  # before wilds, which would create the root folder as a side effect
        import wilds  # heavy import (pandas, ogb); only when needed

        assert self.root is not None
        ds = wilds.get_dataset(
            "camelyon17", root_dir=str(self.root), download=self.download, split_scheme=self.split_scheme
        )
        self.wilds_dataset = ds
        src = WildsSource(ds)
        check_labels(src.labels, self.num_classes, "camelyon17 metadata.csv 'tumor'")
        split_array = np.asarray(ds.split_array)
        self._wilds_idx = {s: np.flatnonzero(split_array == ds.split_dict[s]) for s in WILDS_SPLITS}

        idx: dict[str, np.ndarray] = {}
        self.bad_files = []
        for k, (role, s) in enumerate(self.splits.items()):
            idx[role] = seeded_subset(self._wilds_idx[s], self.caps[role], self.seed + k)
            if len(idx[role]) == 0:
                raise DataNotFoundError(
                    f"camelyon17: wilds split '{s}' (used as {role}) is empty in {ds.data_dir}"
                )
            if self.verify:
                idx[role], bad = verify_source(src, idx[role], self.on_bad_file, f"camelyon17 {s}")
                self.bad_files += bad
        # global wilds ids (rows of metadata.csv)
        self._split_idx = {k: v.tolist() for k, v in idx.items()}
        mean, std = self.spec.mean, self.spec.std
        ev = histology_transforms(self.image_size, mean, std, train=False, augment=False)
        tr = histology_transforms(self.image_size, mean, std, train=True, augment=self.augment)
        self._datasets = {
            k: TransformSubset(src, v, tr if k == "train" else ev) for k, v in self._split_idx.items()
        }
        self._calib = TransformSubset(src, self._split_idx["train"], ev)
        # raw_dataset / as_ood take wilds split names (train, id_val, test, val = hospital 1), whole splits
        self._raw = {s: TransformSubset(src, v) for s, v in self._wilds_idx.items()}
        self._source = src

    def as_ood(self, spec: ImageSpec, n: int | None, seed: int, split: str = "test") -> Dataset:
        """``n`` seeded random patches of a whole wilds split (paper: 1,000 of 'val'), converted to ``spec``.

        Items index the wilds dataset by global id (``.indices``); with ``verify`` the chosen patches are
        decoded first and unreadable ones are excluded and added to ``bad_files``.
        """
        raw = self.raw_dataset(split)
        assert isinstance(raw, TransformSubset)
        chosen = seeded_subset(np.arange(len(raw)), n, seed)
        ids = np.asarray(raw.indices, dtype=np.int64)[chosen]
        if self.verify:
            ids, bad = verify_source(self._source, ids, self.on_bad_file, f"camelyon17 {split} (OOD)")
            self.bad_files += [b for b in bad if b not in self.bad_files]
        return TransformSubset(self._source, ids.tolist(), SpecTransform(spec), label=-1)

    def wilds_ids(self, split: str) -> list[int]:
        """Global ids (metadata.csv rows) of every item of a wilds split."""
        self._need()
        return self._wilds_idx[split].tolist()
