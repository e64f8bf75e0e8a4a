"""Fabricate tiny on-disk copies of each real data format (random pixels, real layout) for tests.

Plain functions so any test can build a data root under ``tmp_path``; each returns the root it made.
"""

from __future__ import annotations

import csv
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# The real archive's names, written out again on purpose: a fabricated copy that imported them from
# qbdl.data would hide a wrong constant there.
KATHER_FOLDER = "Kather_texture_2016_image_tiles_5000"
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


def _rgb(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")


def make_imagenet(
    root: str | Path,
    n_classes: int = 3,
    n_per_class: int = 4,
    size: int = 40,
    n_val_per_class: int | None = None,
    seed: int = 0,
) -> Path:
    """ImageFolder layout ``root/{train,val}/<wnid>/*.JPEG`` with random RGB JPEGs (not square: size x size+8)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [f"n{1440764 + 17 * k:08d}" for k in range(n_classes)]
    for split, n in (("train", n_per_class), ("val", n_val_per_class or n_per_class)):
        for k, w in enumerate(wnids):
            d = root / split / w
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
                name = f"{w}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{k * n + i + 1:08d}.JPEG"
                Image.fromarray(arr, "RGB").save(d / name, format="JPEG", quality=90)
    return root


def make_colorectal(
    root: str | Path, n_per_class: int = 10, size: int = 150, as_zip: bool = False, seed: int = 0
) -> Path:
    """Kather 2016 layout: ``root/Kather_texture_2016_image_tiles_5000/<class>/*.tif`` (or the .zip of it)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[tuple[str, bytes]] = []
    for k, c in enumerate(KATHER_CLASSES):
        for i in range(n_per_class):
            # names like the real tiles: <id>_CRC-Prim-HE-<nn>_<nnn>.tif_Row_<r>_Col_<c>.tif
            name = f"{KATHER_FOLDER}/{c}/{1000 + 37 * i + k:X}_CRC-Prim-HE-0{k + 1}_0{i:02d}.tif_Row_{151 * i + 1}_Col_1.tif"
            buf = io.BytesIO()
            _rgb(rng, size).save(buf, format="TIFF")
            files.append((name, buf.getvalue()))
    if as_zip:
        with zipfile.ZipFile(root / f"{KATHER_FOLDER}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for c in KATHER_CLASSES:
                zf.writestr(f"{KATHER_FOLDER}/{c}/", b"")  # directory entries, as in the real archive
            for name, data in files:
                zf.writestr(name, data)
    else:
        for name, data in files:
            p = root / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    return root


# center -> wilds split code written in metadata.csv (wilds itself overrides centers 1 and 2 to val/test)
_CAMELYON_SPLITS = {"train": (0, 0), "id_val": (3, 1), "val": (1, 0), "test": (2, 0)}


def make_camelyon17(root: str | Path, n_per_split: int = 8, size: int = 96, seed: int = 0) -> Path:
    """Camelyon17-WILDS v1.0 layout under ``root/camelyon17_v1.0`` with ``n_per_split`` patches per split."""
    root = Path(root)
    d = root / "camelyon17_v1.0"
    (d / "patches").mkdir(parents=True, exist_ok=True)
    (d / "RELEASE_v1.0.txt").write_text("v1.0 (fabricated for tests)\n")
    rng = np.random.default_rng(seed)
    rows = []
    for s_i, (center, code) in enumerate(_CAMELYON_SPLITS.values()):
        for i in range(n_per_split):
            patient, node = f"{10 * center + (i % 2):03d}", i % 3
            x, y = 96 * (i + 1) + 7 * s_i, 96 * (2 * i + 3)
            pdir = d / "patches" / f"patient_{patient}_node_{node}"
            pdir.mkdir(parents=True, exist_ok=True)
            _rgb(rng, size).save(pdir / f"patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png")
            slide = 10 * center + node
            rows.append([patient, node, x, y, i % 2, slide, center, code])
    with open(d / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"])
        for k, r in enumerate(rows):
            w.writerow([k, *r])
    return root


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """IDX (big-endian) file as in LeCun's MNIST: magic 0x0000 08 <ndim>, dims as uint32, uint8 data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.tobytes())


def _make_idx_set(root: Path, folder: str, n_train: int, n_test: int, seed: int) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        )
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def make_mnist(root: str | Path, n_train: int = 100, n_test: int = 50, seed: int = 0) -> Path:
    """MNIST raw idx files ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (labels cycle 0..9)."""
    return _make_idx_set(Path(root), "MNIST", n_train, n_test, seed)


def make_fashion_mnist(root: str | Path, n_train: int = 100, n_test: int = 50, seed: int = 1) -> Path:
    """Fashion-MNIST raw idx files under ``root/FashionMNIST/raw/``."""
    return _make_idx_set(Path(root), "FashionMNIST", n_train, n_test, seed)


def corrupt_file(path: str | Path, keep: int = 64) -> Path:
    """Truncate an image file to its first ``keep`` bytes (header survives, pixel data does not)."""
    path = Path(path)
    path.write_bytes(path.read_bytes()[:keep])
    return path


def corrupt_zip_member(zip_path: str | Path, member_index: int = 0, keep: int = 64) -> str:
    """Rewrite a zip with one image member truncated; returns that member's name."""
    zip_path = Path(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        items = [(i, zf.read(i)) for i in zf.infolist()]
    images = [i for i, _ in items if not i.filename.endswith("/")]
    target = images[member_index].filename
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info, data in items:
            zf.writestr(info.filename, data[:keep] if info.filename == target else data)
    return target


# --------------------------------------------------------------------------------------------- data shift


def make_imagenet_c(
    root: str | Path,
    wnids: list[str],
    corruptions: tuple[str, ...] = ("gaussian_noise", "fog"),
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    n_per_class: int = 2,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """ImageNet-C layout ``root/<corruption>/<severity>/<wnid>/*.JPEG`` (random size x size RGB JPEGs)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in corruptions:
        for s in severities:
            for w in wnids:
                d = root / c / str(s) / w
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n_per_class):
                    _rgb(rng, size).save(d / f"ILSVRC2012_val_{i + 1:08d}.JPEG", format="JPEG", quality=85)
    return root


def make_cifar10_c(
    root: str | Path,
    corruptions: tuple[str, ...] = ("gaussian_noise", "fog"),
    n_per_severity: int = 6,
    seed: int = 0,
) -> Path:
    """CIFAR-10-C layout: ``root/<corruption>.npy`` uint8 [5n, 32, 32, 3] (severities 1..5 in order) and
    ``root/labels.npy`` [5n]. Severity s's images are all filled with the value 10*s in channel 0, so a
    test can tell which block was read."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = n_per_severity
    labels = np.tile(np.arange(n) % 10, 5).astype(np.uint8)
    np.save(root / "labels.npy", labels)
    for c in corruptions:
        x = rng.integers(0, 256, size=(5 * n, 32, 32, 3), dtype=np.uint8)
        for s in range(1, 6):
            x[(s - 1) * n : s * n, :, :, 0] = 10 * s
        np.save(root / f"{c}.npy", x)
    return root


def make_mnist_c(
    root: str | Path, corruptions: tuple[str, ...] = ("shot_noise", "rotate"), n: int = 12, seed: int = 0
) -> Path:
    """MNIST-C layout: ``root/<corruption>/test_images.npy`` uint8 [n, 28, 28, 1] and ``test_labels.npy``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in corruptions:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "test_images.npy", rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8))
        np.save(d / "test_labels.npy", (np.arange(n) % 10).astype(np.uint8))
        # the real set also ships train_*.npy; readers must not need them
        np.save(d / "train_labels.npy", np.zeros(1, dtype=np.uint8))
    return root
