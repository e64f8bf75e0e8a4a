#!/usr/bin/env python
"""Download the real data sets qbdl reads (needs internet; never run by the tests).

    python scripts/download_data.py colorectal --root data/colorectal   # Zenodo record 53169 (~250 MB)
    python scripts/download_data.py camelyon17 --root data/wilds        # wilds / CodaLab (~10 GB)
    python scripts/download_data.py mnist --root data                   # also fashion_mnist, cifar10, svhn

ImageNet cannot be downloaded by script (login at https://image-net.org); see qbdl.data.imagenet.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import urllib.request
import zipfile
from pathlib import Path

KATHER_NAME = "Kather_texture_2016_image_tiles_5000"
KATHER_URL = f"https://zenodo.org/records/53169/files/{KATHER_NAME}.zip?download=1"
# SHA-384 of the zip as recorded by OpenFL (github.com/securefederatedai/openfl,
# openfl-tutorials/deprecated/interactive_api/PyTorch_Histology_FedCurv/envoy/histology_shard_descriptor.py,
# HistologyDataset.ZIP_SHA384). No SHA-256 is published for this file: the script prints it for the record.
KATHER_SHA384 = (
    "7d86abe1d04e68b77c055820c2a4c582a1d25d2983e38ab724eac75affce8b7cb2cbf5ba68848dcfd9d84005d87d6790"
)


def file_hashes(path: Path) -> dict[str, str]:
    """SHA-256 and SHA-384 of a file, read in 1 MiB blocks."""
    h256, h384 = hashlib.sha256(), hashlib.sha384()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h256.update(block)
            h384.update(block)
    return {"sha256": h256.hexdigest(), "sha384": h384.hexdigest()}


def download_colorectal(root: Path, extract: bool, force: bool) -> None:
    """Fetch the Kather 2016 zip from Zenodo, check its SHA-384, optionally extract it."""
    root.mkdir(parents=True, exist_ok=True)
    zpath = root / f"{KATHER_NAME}.zip"
    if zpath.exists() and not force:
        print(f"{zpath} exists; checking it (use --force to re-download)")
    else:
        tmp = zpath.with_suffix(".zip.part")
        print(f"downloading {KATHER_URL} -> {zpath}")
        with urllib.request.urlopen(KATHER_URL) as r, open(tmp, "wb") as f:  # noqa: S310 - fixed https URL
            shutil.copyfileobj(r, f, length=1 << 20)
        tmp.replace(zpath)
    hashes = file_hashes(zpath)
    print(f"sha256 {hashes['sha256']}  {zpath.name}")
    print(f"sha384 {hashes['sha384']}  {zpath.name}")
    if hashes["sha384"] != KATHER_SHA384:
        sys.exit(
            f"SHA-384 mismatch for {zpath}: expected {KATHER_SHA384} (published by OpenFL). "
            "The download is corrupt or Zenodo changed the file; delete it and retry, or compare the md5 "
            "shown on https://zenodo.org/records/53169 with `md5sum`."
        )
    print("SHA-384 matches the published value.")
    with zipfile.ZipFile(zpath) as zf:
        bad = zf.testzip()
        if bad is not None:
            sys.exit(f"{zpath}: member {bad} fails its CRC check; delete the zip and re-download")
        if extract:
            zf.extractall(root)
            print(f"extracted to {root / KATHER_NAME}")
        else:
            print("qbdl reads the zip directly; pass --extract to unpack it.")


def download_camelyon17(root: Path) -> None:
    """Let wilds download and unpack Camelyon17-WILDS v1.0 under root (its archive is checked by size)."""
    import wilds

    ds = wilds.get_dataset("camelyon17", root_dir=str(root), download=True)
    print(f"camelyon17 ready in {ds.data_dir}: {len(ds)} patches")


def download_torchvision(name: str, root: Path) -> None:
    """torchvision's own downloaders (they check the published md5 of every file)."""
    from torchvision import datasets as tvd

    if name == "svhn":
        for split in ("train", "test"):
            tvd.SVHN(str(root), split=split, download=True)
    else:
        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
        for train in (True, False):
            cls(str(root), train=train, download=True)
    print(f"{name} ready under {root}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=["colorectal", "camelyon17", "mnist", "fashion_mnist", "cifar10", "svhn"])
    p.add_argument(
        "--root", type=Path, required=True, help="data root (the `root` key of conf/data/NAME.yaml)"
    )
    p.add_argument("--extract", action="store_true", help="colorectal: also unpack the zip")
    p.add_argument("--force", action="store_true", help="colorectal: re-download an existing zip")
    a = p.parse_args(argv)
    if a.name == "colorectal":
        download_colorectal(a.root, a.extract, a.force)
    elif a.name == "camelyon17":
        download_camelyon17(a.root)
    else:
        download_torchvision(a.name, a.root)


if __name__ == "__main__":
    main()
