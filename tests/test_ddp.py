"""trainer=ddp: Lightning DDP (ddp_spawn, gloo) with 2 CPU processes; each rank evaluates its share of every set,
rank 0 gathers: results.json equals a one-process evaluation of the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_wandb import CLI_TINY


def _cli(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "qbdl.run", *args], capture_output=True, text=True, timeout=900, env=env
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# PTQ included: rank 0 quantizes once, every rank loads the .qbdl files and evaluates its share
PTQ_TINY = [*(a for a in CLI_TINY if a != "quant=none"), "quant.calib_batches=1", "quant.mc_samples=1",
            "quant.bank_size=2"]  # fmt: skip
# timings, and what only the number of processes changes (each process leaves out its own first batch)
PER_PROCESS = {"images_per_s", "forward_images_per_s", "eval_seconds", "timed_images"}


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in PER_PROCESS}
    return d


@pytest.mark.slow
def test_ddp_fit_and_sharded_evaluation_equal_one_process(tmp_path):
    ddp_fit = tmp_path / "ddp_fit"
    proc = _cli(["trainer=ddp", *CLI_TINY, "logger=csv", f"hydra.run.dir={ddp_fit}"])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr  # two processes really ran the fit
    fit = json.loads((ddp_fit / "results.json").read_text())
    assert set(fit["variants"]) == {"dnn", "dnn_ts", "bnn", "bnn_ts", "bnn_mean"}
    assert fit["config"]["trainer"]["devices"] == 2 and fit["timings"]["evaluation_ranks"] == 2

    # The same weights and seeds, with PTQ, evaluated by 2 ranks and by 1 process: equal results.json.
    weights = [f"dnn.checkpoint={ddp_fit / 'dnn.safetensors'}", f"bnn.checkpoint={ddp_fit / 'bnn.safetensors'}",
               "bnn.max_epochs=0", "logger=none",  # and two corrupted sets of 32 images x 2 severities
               "shift=digits", "shift.corruptions=[gaussian_noise,rotate]", "shift.severities=[1,3]",
               "shift.max_items=32"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _cli([*PTQ_TINY, *weights, f"hydra.run.dir={one}"])
    _cli(["trainer=ddp", *PTQ_TINY, *weights, f"hydra.run.dir={two}"])
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert {"qbnn", "qdnn", "bnn", "dnn"} <= set(a["variants"]) and a["shift"]["meta"]["n"]
    assert a["timings"]["evaluation_ranks"] == 1 and b["timings"]["evaluation_ranks"] == 2
    assert _strip(a["variants"]) == _strip(b["variants"])  # exact: the same batches, the same MC seeds
    for k in ("temperatures", "data", "validation", "shift", "quantization_seconds"):
        assert (a[k].keys() if k == "quantization_seconds" else a[k]) == (
            b[k].keys() if k == "quantization_seconds" else b[k]
        ), k
    pa, pb = np.load(one / "predictions.npz"), np.load(two / "predictions.npz")
    assert sorted(pa.files) == sorted(pb.files)
    for f in pa.files:
        np.testing.assert_array_equal(pa[f], pb[f], err_msg=f)
    # PTQ ran once: one file per model, made by rank 0 (the same fingerprint as the one-process run's)
    from qbdl.quant import load_qbnn

    for name in ("qbnn", "qdnn"):
        fa, fb = (load_qbnn(d / "models" / f"{name}.qbdl").qbdl_meta["fingerprint"] for d in (one, two))
        assert fa == fb


@pytest.mark.slow
def test_ddp_with_wandb_logger(tmp_path):
    """The spawned workers log into the main process's W&B run; media land in the run dir's offline run."""
    from test_wandb import check_wandb_run

    _cli(["trainer=ddp", *CLI_TINY, f"hydra.run.dir={tmp_path}"])
    check_wandb_run(tmp_path)


@pytest.mark.slow
def test_a_rank_killed_during_sharded_evaluation_fails_cleanly_and_resumes(tmp_path):
    run = ["trainer=ddp", *PTQ_TINY, "logger=none", f"hydra.run.dir={tmp_path}"]
    kill = [
        "+callbacks.kill._target_=ddp_kill.KillRankOne",
        f"+callbacks.kill.cache_dir={tmp_path / 'eval_cache'}",
    ]
    proc = _cli([*run, *kill], check=False)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "a DDP worker process died" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr  # one paragraph, not a stack
    assert not (tmp_path / "results.json").exists()  # never built from a partial gather
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval_cache").glob("*.safetensors")}
    assert done  # the variants evaluated completely before the kill
    _cli(run)  # the same command again: resumes
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"dnn", "bnn", "qbnn", "qdnn"} <= set(res["variants"]) and res["timings"]["evaluation_ranks"] == 2
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished variants reused, not redone
