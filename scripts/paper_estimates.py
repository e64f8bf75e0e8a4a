"""The run's own start-up estimate (qbdl.experiment.estimate) for the paper's experiments at their real sizes.

    python scripts/paper_estimates.py [--out docs/data/estimates.json] [NAME ...]

``python -m qbdl.run`` logs this estimate at start-up, once the data is on disk. This script gives it
without the data: it composes each experiment's config exactly as ``python -m qbdl.run +experiment=NAME``
does, builds its model (random weights: the time does not depend on them), and hands
``estimate_for_config`` a stand-in datamodule whose splits have the real data sets' sizes (below) and
whose batches are random images of the configured size. The probe then times the real training steps,
calibration and evaluation batches of every variant on this machine, as a run would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import open_dict
from torch.utils.data import DataLoader, Dataset

from qbdl.experiment.estimate import estimate_for_config, format_estimate
from qbdl.machine import machine_info
from qbdl.run import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]

# Real sizes (images) of each experiment's splits as its config selects them.
IMAGENET_TRAIN = 1_281_167  # ILSVRC2012 train/
IMAGENET_VAL = 50_000  # ILSVRC2012 val/ (qbdl's test split)


def _imagenet_sizes(cfg) -> dict:
    carve = math.floor(IMAGENET_TRAIN * cfg.data.val_fraction)  # stratified 1% of train/ (per class, ~ this)
    cap = lambda n, c: n if c is None else min(n, c)  # noqa: E731
    return {
        "train": cap(IMAGENET_TRAIN - carve, cfg.data.max_train),
        "val": cap(carve, cfg.data.max_val),
        "test": cap(IMAGENET_VAL, cfg.data.max_test),
        "ood": {},
        "classes": 1000,
    }


def _colorectal_sizes(cfg) -> dict:
    n = 5000  # Kather 2016: 8 classes x 625 tiles
    test = round(n * cfg.data.test_fraction)
    val = round((n - test) * cfg.data.val_fraction)
    return {
        "train": n - test - val,
        "val": val,
        "test": test,
        "ood": {"camelyon17": cfg.eval.ood.camelyon17.n},
        "classes": 8,
    }


EXPERIMENTS = {
    "imagenet_ptq_smoke": _imagenet_sizes,
    "imagenet_ptq": _imagenet_sizes,
    "colorectal_ptq": _colorectal_sizes,
}


class _Images(Dataset):
    """n random images of one size (only the first batch is ever read)."""

    def __init__(self, n: int, chans: int, size: int, classes: int) -> None:
        self.n, self.shape, self.classes = n, (chans, size, size), classes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(self.shape, generator=g), i % self.classes


class _Sizes:
    """Stands in for the datamodule: real split sizes, the configured batch sizes and image size."""

    def __init__(self, sizes: dict, cfg) -> None:
        size, c = cfg.data.image_size, sizes["classes"]
        self.sets = {k: _Images(sizes[k], 3, size, c) for k in ("train", "val", "test")}
        self.batch = cfg.data.batch_size
        self.eval_batch = cfg.data.get("eval_batch_size") or self.batch

    def dataset(self, split: str) -> Dataset:
        return self.sets[split]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["train"], batch_size=self.batch, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["val"], batch_size=self.eval_batch)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.sets["test"], batch_size=self.eval_batch)


def estimate(name: str, overrides: list[str] = ()) -> dict:
    """The start-up estimate of ``python -m qbdl.run +experiment=NAME [overrides]`` at the real data sizes."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", "model.weights=null", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/unused"
    sizes = EXPERIMENTS[name](cfg)
    dm = _Sizes(sizes, cfg)
    model = instantiate(cfg.model, num_classes=sizes["classes"], in_chans=3)
    ood = {k: DataLoader(_Images(n, 3, cfg.data.image_size, 2)) for k, n in sizes["ood"].items()}
    torch.manual_seed(0)
    est = estimate_for_config(cfg, dm, model, ood)
    print(f"+experiment={name}\n{format_estimate(est)}", flush=True)
    return {
        "command": f"python -m qbdl.run +experiment={name}",
        "sizes": {k: v for k, v in sizes.items() if k != "classes"},
        "epochs": {"dnn": cfg.dnn.max_epochs, "bnn": cfg.bnn.max_epochs},
        "mc_samples": cfg.eval.mc_samples,
        "batch_size": cfg.data.batch_size,
        "shift_sets": len(cfg.shift.corruptions) * len(cfg.shift.severities),
        "estimate": est,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(EXPERIMENTS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "data" / "estimates.json"))
    ap.add_argument("--override", action="append", default=[], help="a Hydra override for every experiment")
    args = ap.parse_args()
    t0 = time.time()
    runs = {n: estimate(n, args.override) for n in args.names}
    commit = (
        os.environ.get("QBDL_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )
    report = {
        "machine": machine_info(),
        "provenance": {
            "command": "python scripts/paper_estimates.py",
            "commit": commit or "unknown",
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "note": os.environ.get("QBDL_NOTE", ""),
        },
        "seconds": time.time() - t0,
        "experiments": runs,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
