"""The package as users install it (a wheel, not the repo): `python -m qbdl.run` finds its configs."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """qbdl built into a wheel and installed with --no-deps into a fresh target directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    # a copy of the project's own files: setuptools writes build/ beside the sources, never into the checkout
    src = tmp / "project"
    skip = shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "outputs", "multirun"
    )
    shutil.copytree(ROOT, src, symlinks=True, ignore=skip)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next(tmp.glob("qbdl-*.whl"))
    target = tmp / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stderr[-3000:]
    return wheel, target


def _env(target: Path) -> dict:
    # the target first: it shadows the editable checkout that the test venv also has
    return {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}


def test_wheel_carries_every_config(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    in_repo = sorted(p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src/qbdl/conf").rglob("*.yaml"))
    assert in_repo and all(n in names for n in in_repo), sorted(set(in_repo) - set(names))
    csrc = sorted(p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src/qbdl/quant/csrc").iterdir())
    missing = sorted(set(csrc) - set(names))  # the C++ ops are built from these on first use
    assert "qbdl/quant/csrc/inplace.cpp" in csrc and not missing, missing


def test_installed_run_from_an_empty_directory(installed, tmp_path):
    _, target = installed
    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import qbdl; print(qbdl.__file__)"],
        env=_env(target), cwd=work, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(target))
    dump = subprocess.run(
        [sys.executable, "-m", "qbdl.run", "--cfg", "job", "+experiment=imagenet_ptq"],
        env=_env(target), cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dump.returncode == 0, dump.stderr[-3000:]
    assert "resnet50" in dump.stdout and "IMAGENET1K_V1" in dump.stdout
    out = tmp_path / "run"
    tiny = [
        "logger=none", "dnn.max_epochs=1", "bnn.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "eval.mc_samples=2", "quant.calib_batches=1", "quant.mc_samples=1",
        "quant.bank_size=2", "data.image_size=8", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}",
    ]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "qbdl.run", *tiny], env=_env(target), cwd=work, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert {"dnn", "qdnn", "bnn", "qbnn"} <= set(res["variants"])
    assert not list(work.iterdir())  # nothing written where it was started


def test_user_experiment_from_config_dir(installed, tmp_path):
    """Users add experiments without forking: --config-dir (documented in the README)."""
    _, target = installed
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "my_digits.yaml").write_text("# @package _global_\nbnn:\n  max_epochs: 7\nseed: 42\n")
    dump = subprocess.run(
        [sys.executable, "-m", "qbdl.run", "--config-dir", str(tmp_path / "my_conf"), "--cfg", "job",
         "+experiment=my_digits"],
        env=_env(target), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dump.returncode == 0, dump.stderr[-3000:]
    assert "max_epochs: 7" in dump.stdout and "seed: 42" in dump.stdout
