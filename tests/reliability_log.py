"""Records of the reliability tests (what was tried, how often, what happened) and their shared tiny settings.

Each reliability test calls :func:`record`; the records go, one JSON object a line, to the file named by the
environment variable ``QBDL_RELIABILITY_LOG`` (default ``tests/.reliability/records.jsonl``, gitignored).
``python scripts/reliability_summary.py`` renders them (latest per test and fault) as the README's
reliability section. No conftest
hooks are involved: a test that is not run leaves no record, a test that fails before ``record`` neither.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

DEFAULT_LOG = Path(__file__).parent / ".reliability" / "records.jsonl"

# Runs whose subject is not quantization (kill/resume, loading, bad input) use quant=none by default to stay
# fast; QBDL_RELIABILITY_PTQ=1 runs them with PTQ too. The determinism / test-data runs always include PTQ.
USE_PTQ = os.environ.get("QBDL_RELIABILITY_PTQ", "0") == "1"

# Tiny run settings shared by the reliability tests (in-process and through the CLI).
TINY_BASE = [
    "dnn.max_epochs=1",
    "bnn.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "eval.mc_samples=2",
    "data.image_size=16",
    "logger=none",
]
TINY_PTQ = ["quant.calib_batches=1", "quant.mc_samples=1", "quant.bank_size=2"]


def tiny_overrides(ptq: bool | None = None) -> list[str]:
    """Tiny settings with PTQ (its own tiny settings) or quant=none."""
    ptq = USE_PTQ if ptq is None else ptq
    return [*TINY_BASE, *(TINY_PTQ if ptq else ["quant=none"])]


def log_path() -> Path:
    """Where records go: $QBDL_RELIABILITY_LOG or tests/.reliability/records.jsonl."""
    return Path(os.environ.get("QBDL_RELIABILITY_LOG") or DEFAULT_LOG)


def record(
    test: str,
    category: str,
    inputs: str,
    fault: str,
    count: int,
    outcome: str,
    **extra: object,
) -> dict:
    """Append one record: `count` trials of `fault` on `inputs` in `test` (a category of the summary) ended in `outcome`."""
    rec = {
        "test": test,
        "category": category,
        "inputs": inputs,
        "fault": fault,
        "count": int(count),
        "outcome": outcome,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(rec, sort_keys=False, default=str) + "\n"
    # one write() of a short line to an O_APPEND file: concurrent test processes do not interleave records
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return rec


def tiny_config(out_dir: str | os.PathLike, overrides: list[str] = (), ptq: bool | None = None):
    """The real Hydra config with the tiny settings and `overrides`, writing into out_dir (for `qbdl.pipeline.run.run`)."""
    from helpers_run import compose_config
    from omegaconf import open_dict

    cfg = compose_config(Path(out_dir), [*tiny_overrides(ptq), *overrides], tiny=False)
    with open_dict(cfg):
        # the composed `hydra` node has fields only a real launch fills (hydra.job.num); the CLI's task
        # config has no `hydra` node either.
        cfg.pop("hydra", None)
    return cfg
