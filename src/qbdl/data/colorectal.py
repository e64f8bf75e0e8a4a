"""Colorectal cancer histology textures (Kather et al. 2016, Zenodo record 53169), folder or zip."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import torch
import torchvision.transforms.v2 as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from qbdl.data.errors import DataNotFoundError, not_found_message
from qbdl.data.module import CLASS_DEFAULT, DataSettings, ImageDataModule
from qbdl.data.sources import FileSource, ImageSource, ZipSource, verify_source
from qbdl.data.splits import TransformSubset, check_labels, stratified_split

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Unpack

log = logging.getLogger(__name__)

KATHER_FOLDER = "Kather_texture_2016_image_tiles_5000"
KATHER_ZIP = KATHER_FOLDER + ".zip"
KATHER_CLASSES = [
    "01_TUMOR",
    "02_STROMA",
    "03_COMPLEX",
    "04_LYMPHO",
    "05_DEBRIS",
    "06_MUCOSA",
    "07_ADIPOSE",
    "08_EMPTY",
]
KATHER_URL = "https://zenodo.org/records/53169"
COLORECTAL_LAYOUT = f"""
ROOT/
  {KATHER_ZIP}        (read directly, no extraction needed)   OR
  {KATHER_FOLDER}/
    01_TUMOR/  *.tif  (625 tiles, 150x150 RGB)
    02_STROMA/ ... 08_EMPTY/
"""
COLORECTAL_HOW = (
    f"download {KATHER_ZIP} from Zenodo record 53169 ({KATHER_URL}) or run "
    "`python scripts/download_data.py colorectal --root ROOT`."
)


def histology_transforms(
    image_size: int, mean: Sequence[float], std: Sequence[float], train: bool, augment: bool
) -> T.Compose:
    """RGB, resize to image_size x image_size (tiles of another size are resized too), flips when training."""
    flips = [T.RandomHorizontalFlip(), T.RandomVerticalFlip()] if (train and augment) else []
    return T.Compose(
        [
            T.RGB(),  # gray / RGBA tiles become RGB; that is normal
            T.Resize((image_size, image_size), antialias=True),
            *flips,  # tissue has no canonical orientation
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


class ColorectalDataModule(ImageDataModule):
    """Kather 2016: 5,000 tiles, 8 classes in folder order; seeded stratified train/val/test split."""

    name = "colorectal"
    num_classes = len(KATHER_CLASSES)
    class_names = tuple(KATHER_CLASSES)
    root = "data/colorectal"
    batch_size = 32

    def __init__(
        self,
        root: str | Path | None = CLASS_DEFAULT,
        *,
        test_fraction: float = 0.2,
        val_fraction: float = 0.1,
        source: str = "auto",
        verify: bool = True,
        on_bad_file: str = "skip",
        **settings: Unpack[DataSettings],
    ) -> None:
        super().__init__(root, **settings)
        if source not in ("auto", "folder", "zip"):
            raise ValueError(f"colorectal: source must be auto, folder or zip, got {source!r}")
        self.test_fraction = float(test_fraction)
        self.val_fraction = float(val_fraction)
        self.source_kind = source
        self.verify = bool(verify)
        self.on_bad_file = str(on_bad_file)
        self.source: ImageSource | None = None

    def _missing(self, path: Path | None, problem: str = "not found") -> DataNotFoundError:
        return DataNotFoundError(
            not_found_message("Colorectal (Kather 2016)", path, COLORECTAL_LAYOUT, COLORECTAL_HOW, problem)
        )

    def _folder(self) -> Path | None:
        assert self.root is not None
        for cand in (self.root / KATHER_FOLDER, self.root):
            if (cand / KATHER_CLASSES[0]).is_dir():
                return cand
        return None

    def _from_folder(self, folder: Path) -> FileSource:
        paths: list[Path] = []
        labels: list[int] = []
        for k, c in enumerate(KATHER_CLASSES):
            d = folder / c
            if not d.is_dir():
                raise self._missing(d, problem="is missing a class folder")
            files = sorted(p for p in d.iterdir() if p.is_file() and _is_image(p.name))
            if not files:
                raise DataNotFoundError(
                    f"Colorectal class folder '{d}' is empty (no image files); each of the 8 class folders "
                    f"needs its tiles. Re-extract {KATHER_ZIP} from {KATHER_URL}."
                )
            paths += files
            labels += [k] * len(files)
        extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in KATHER_CLASSES)
        if extra:
            log.warning("colorectal: ignoring folders that are not Kather classes in %s: %s", folder, extra)
        return FileSource(paths, labels)

    def _from_zip(self, zpath: Path) -> ZipSource:
        try:
            with zipfile.ZipFile(zpath) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise self._missing(zpath, problem=f"is not a readable zip ({e}); re-download it") from e
        by_class: dict[str, list[str]] = {c: [] for c in KATHER_CLASSES}
        for n in names:
            p = PurePosixPath(n)
            if n.endswith("/") or "__MACOSX" in p.parts or not _is_image(p.name):
                continue
            if p.parent.name in by_class:
                by_class[p.parent.name].append(n)
        members: list[str] = []
        labels: list[int] = []
        for k, c in enumerate(KATHER_CLASSES):
            if not by_class[c]:
                raise DataNotFoundError(
                    f"Colorectal zip '{zpath}' has no image files in class folder '{c}/'; the archive is "
                    f"incomplete or not {KATHER_ZIP}. Re-download it from {KATHER_URL}."
                )
            members += sorted(by_class[c])
            labels += [k] * len(by_class[c])
        return ZipSource(zpath, members, labels)

    def _setup(self) -> None:
        if self.root is None or not self.root.exists():
            raise self._missing(self.root)
        folder = self._folder() if self.source_kind in ("auto", "folder") else None
        zpath = self.root / KATHER_ZIP
        if folder is not None:
            src: ImageSource = self._from_folder(folder)
        elif self.source_kind in ("auto", "zip") and zpath.is_file():
            src = self._from_zip(zpath)
        else:
            tried = self.root / KATHER_FOLDER if self.source_kind == "folder" else zpath
            raise self._missing(tried)
        check_labels(src.labels, self.num_classes, "colorectal")
        self.source = src

        parts = stratified_split(
            src.labels,
            {
                "test": self.test_fraction,
                "val": (1 - self.test_fraction) * self.val_fraction,
                "train": (1 - self.test_fraction) * (1 - self.val_fraction),
            },
            self.seed,
        )
        self.bad_files = []
        if self.verify:
            for split in ("train", "val", "test"):
                parts[split], bad = verify_source(src, parts[split], self.on_bad_file, f"colorectal {split}")
                self.bad_files += bad
        # indices into the class-ordered, name-sorted list of tiles (same for folder and zip)
        self._split_idx = {k: parts[k].tolist() for k in ("train", "val", "test")}
        mean, std = self.spec.mean, self.spec.std
        ev = histology_transforms(self.image_size, mean, std, train=False, augment=False)
        tr = histology_transforms(self.image_size, mean, std, train=True, augment=self.augment)
        self._datasets = {
            k: TransformSubset(src, v, tr if k == "train" else ev) for k, v in self._split_idx.items()
        }
        self._calib = TransformSubset(src, self._split_idx["train"], ev)
        self._raw = {k: TransformSubset(src, v) for k, v in self._split_idx.items()}

    def item_names(self) -> list[str]:
        """Path (or zip!member) of every tile, in index order."""
        self._need()
        assert self.source is not None
        return [self.source.describe(i) for i in range(len(self.source))]
