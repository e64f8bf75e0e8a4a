"""The PTQ stage: calibrate on training batches, convert, save as .qbdl; reuse a saved model made the same way."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from qbdl import quant
from qbdl.experiment.evaluate import model_fingerprint, tensors_fingerprint

log = logging.getLogger(__name__)


# quant.quantize_bnn's options but its seed, which the run passes itself (the keys of conf/quant that are not the
# callback's own)
PTQ_OPTIONS = tuple(k for k in quant.PTQ_OPTIONS if k != "seed")


@dataclass
class Quantized:
    """A converted INT8 model, where it is saved, its file size, and the seconds PTQ took (None: reused)."""

    model: nn.Module
    path: Path
    size_bytes: int
    seconds: float | None


def calibration_batches(datamodule: Any, batch_size: int | None, n: int | None) -> list:
    """The first `n` calibration batches (training data), drawn once so every model sees the same images.

    qbdl's datamodules have a calib_dataloader (training split, no augmentation); any other datamodule
    calibrates on its train_dataloader.
    """
    if hasattr(datamodule, "calib_dataloader"):
        loader = datamodule.calib_dataloader(batch_size)
    elif hasattr(datamodule, "train_dataloader"):
        loader = datamodule.train_dataloader()
    else:
        raise ValueError(
            f"PTQ needs training batches to calibrate on, but {type(datamodule).__name__} has neither "
            "calib_dataloader(batch_size) nor train_dataloader(); pass a LightningDataModule to trainer.fit"
        )
    return list(loader if n is None else itertools.islice(loader, n))


def ptq_fingerprint(options: Mapping[str, Any], model: nn.Module, calib: Iterable) -> str:
    """What determines a quantized model: the PTQ options, the weights and the calibration batches."""
    h = hashlib.sha256(json.dumps(dict(options), sort_keys=True, default=str).encode())
    h.update(model_fingerprint(model).encode())
    h.update(tensors_fingerprint(b[0] if isinstance(b, (tuple, list)) else b for b in calib).encode())
    return h.hexdigest()


def quantize_to_file(
    name: str, model: nn.Module, calib: list, options: Mapping[str, Any], path: str | Path
) -> Quantized:
    """quant.quantize_bnn on a CPU copy of `model`, saved to `path`; a file made the same way is loaded instead."""
    path = Path(path)
    fp = ptq_fingerprint(options, model, calib)
    if path.exists():  # a resumed run: reused only if made from the same weights, batches and options
        loaded = load_quantized(path)
        if loaded.model.qbdl_meta.get("fingerprint") == fp:
            log.info("loading %s from %s (already quantized)", name, path)
            return loaded
        log.info("%s: %s was made with other options, weights or data; quantizing again", name, path)
    t0 = time.perf_counter()
    cpu_model = copy.deepcopy(model).cpu().eval()
    batches = tqdm(calib, desc=f"calibrate {name}", leave=False, dynamic_ncols=True)
    q = quant.quantize_bnn(cpu_model, batches, **options)
    q.qbdl_meta = {**getattr(q, "qbdl_meta", {}), "fingerprint": fp}
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    quant.save_qbnn(q, str(path))
    return Quantized(q, path, path.stat().st_size, seconds)


def load_quantized(path: str | Path) -> Quantized:
    """A .qbdl model another process wrote (under DDP: rank 0 quantized, every rank loads)."""
    path = Path(path)
    return Quantized(quant.load_qbnn(path), path, path.stat().st_size, None)
