"""Interrupted runs: SIGKILL a real `python -m qbdl.run` mid-epoch and mid-evaluation, rerun the same command.

Also: atomic writes never leave a partial file, even when the writer is killed at random moments.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_log import USE_PTQ, record, tiny_overrides
from safetensors.torch import load_file

VARIANTS = {"dnn", "bnn", "bnn_mean"} | ({"qbnn", "qdnn"} if USE_PTQ else set())
KEYS = ("accuracy", "nll", "brier", "ece", "uce", "mi_mean", "referral_rate_at_target", "ood_auroc")


def _command(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "qbdl.run",
        *tiny_overrides(),
        "dnn.max_epochs=2",
        "trainer.limit_train_batches=6",
        "checkpoint.every_n_train_steps=1",
        f"hydra.run.dir={out}",
    ]


def _launch(out: Path, n: int) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    log = out.parent / f"launch{n}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            _command(out), stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return proc, log


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
    """SIGKILL the process group as soon as ready() holds; False when the process ended first."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError("timed out waiting for the kill point")


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def _assert_nothing_partial(out: Path) -> None:
    """Every visible JSON parses and every safetensors file loads; no results.json before completion."""
    for f in out.rglob("*.json"):
        if not f.name.startswith("."):
            json.loads(f.read_text())
    for f in out.rglob("*.safetensors"):
        if not f.name.startswith("."):
            load_file(str(f))


def _cache_state(out: Path) -> dict[str, tuple[int, bytes]]:
    return {
        f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in (out / "eval_cache").glob("*.safetensors")
    }


def test_kill_mid_training_and_mid_evaluation_then_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = {s: out / "checkpoints" / s / "last.ckpt" for s in ("dnn", "bnn")}
    steps_total = {"dnn": 2 * 6, "bnn": 1 * 6}
    kills = []

    # 1. killed while the DNN trains (after its first checkpoint, mid-epoch 0)
    proc, _ = _launch(out, 1)
    assert _kill_when(proc, lambda: ckpt["dnn"].exists()), "the run ended before the DNN checkpoint appeared"
    step = _step(ckpt["dnn"])
    assert 1 <= step < steps_total["dnn"]
    assert not (out / "dnn.safetensors").exists() and not (out / "results.json").exists()
    _assert_nothing_partial(out)
    kills.append(f"DNN fit at step {step}/{steps_total['dnn']}")

    # 2. rerun: resumes the DNN from last.ckpt; killed while the BNN trains
    proc, log2 = _launch(out, 2)
    assert _kill_when(proc, lambda: ckpt["bnn"].exists()), log2.read_text()[-3000:]
    text = log2.read_text()
    assert "Restoring states from the checkpoint path" in text and "checkpoints/dnn/last.ckpt" in text, text[
        -3000:
    ]
    assert _step(ckpt["dnn"]) == steps_total["dnn"]  # the DNN stage finished from where it stopped
    bnn_step = _step(ckpt["bnn"])
    assert 1 <= bnn_step <= steps_total["bnn"]
    assert (out / "dnn.safetensors").exists() and not (out / "results.json").exists()
    _assert_nothing_partial(out)
    kills.append(f"BNN fit at step {bnn_step}/{steps_total['bnn']}")

    # 3. rerun: DNN stage complete (not refitted), BNN resumed; killed once a variant's predictions are cached
    proc, log3 = _launch(out, 3)
    cache = out / "eval_cache"
    killed = _kill_when(proc, lambda: cache.is_dir() and any(cache.glob("*.safetensors")))
    text = log3.read_text()
    assert killed, text[-3000:]
    assert "stage dnn: complete" in text and "checkpoints/bnn/last.ckpt" in text, text[-3000:]
    assert not (out / "results.json").exists()
    _assert_nothing_partial(out)
    done_before = _cache_state(out)
    assert 1 <= len(done_before) < len(VARIANTS)
    kills.append(f"evaluation after {len(done_before)}/{len(VARIANTS)} variant(s)")

    # 4. rerun: completes; finished variants are reused from the cache, not recomputed
    proc, log4 = _launch(out, 4)
    assert proc.wait(timeout=300) == 0, log4.read_text()[-3000:]
    done_after = _cache_state(out)
    for name, state in done_before.items():
        assert done_after[name] == state, f"{name} was recomputed"
    assert len(done_after) == len(VARIANTS)
    res = json.loads((out / "results.json").read_text())
    # <name>_ts: from <name>'s cached predictions
    assert set(res["variants"]) == VARIANTS | {f"{v}_ts" for v in VARIANTS if v != "bnn_mean"}
    for v, r in res["variants"].items():
        for k in KEYS:
            assert r[k] is not None, (v, k)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["n_test"] == res["variants"]["dnn"]["n_test"] > 0
    assert _step(ckpt["dnn"]) == steps_total["dnn"] and _step(ckpt["bnn"]) == steps_total["bnn"]
    _assert_nothing_partial(out)
    record(
        "test_kill_mid_training_and_mid_evaluation_then_resume",
        "interruption",
        "python -m qbdl.run (digits, tiny) rerun with the same command after each kill",
        "SIGKILL of the process group: " + "; ".join(kills),
        len(kills),
        f"each rerun resumed (DNN/BNN from last.ckpt, {len(done_before)} cached variant(s) reused "
        "byte-identical); final results.json complete and valid; no partial file at any point",
    )


_WRITER = r"""
import json, os, sys
from qbdl.io import atomic_write_json
path = sys.argv[1]
i = json.load(open(path))["i"] if os.path.exists(path) else 0
print("ready", flush=True)
while True:
    i += 1
    atomic_write_json(path, {"i": i, "payload": "x" * 200000, "list": list(range(20000))})
    print("wrote", i, flush=True)
"""


def test_atomic_json_survives_kill_at_random_moments(tmp_path):
    """A writer rewriting a 300 kB JSON in a loop is SIGKILLed 6 times mid-loop: the file always parses."""
    target = tmp_path / "results.json"
    n_kills, versions = 6, []
    for k in range(n_kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, start_new_session=True
        )
        assert proc.stdout.readline().strip() == b"ready"
        # wait for the writer's progress (this run's first complete write), not for time: slow CPUs too
        assert proc.stdout.readline().startswith(b"wrote")
        time.sleep(0.004 * k)  # then kill at varying moments of the write cycle
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if not target.exists():
            continue
        data = json.loads(target.read_text())  # never partial
        assert len(data["payload"]) == 200000 and len(data["list"]) == 20000
        versions.append(data["i"])
    assert len(versions) == n_kills and versions == sorted(set(versions))  # every run wrote, none went back
    assert versions[-1] >= n_kills
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "results.json"]
    record(
        "test_atomic_json_survives_kill_at_random_moments",
        "interruption",
        "atomic_write_json of a 300 kB JSON in a loop (each new writer continues the version count)",
        "SIGKILL of the writer at varying moments",
        n_kills,
        f"results.json parsed complete after every kill ({versions[-1]} versions written in all); "
        f"{len(leftovers)} hidden temp file(s) left by killed writes, never a partial results.json",
    )


@pytest.mark.slow
def test_kill_before_any_checkpoint_restarts_cleanly(tmp_path):
    """Killed during data setup (no checkpoint yet): the rerun starts afresh and completes."""
    out = tmp_path / "run"
    out.mkdir()
    proc, _ = _launch(out, 1)
    assert _kill_when(proc, lambda: (out / "splits.json").exists() or (out / ".hydra").exists())
    proc, log = _launch(out, 2)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert set(json.loads((out / "results.json").read_text())["variants"]) == VARIANTS | {
        f"{v}_ts" for v in VARIANTS if v != "bnn_mean"
    }
    record(
        "test_kill_before_any_checkpoint_restarts_cleanly",
        "interruption",
        "python -m qbdl.run (digits, tiny)",
        "SIGKILL before the first checkpoint",
        1,
        "rerun started afresh and completed",
    )
