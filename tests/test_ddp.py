"""trainer=ddp: Lightning DDP (ddp_spawn, gloo) with 2 CPU processes; rank 0 evaluates, results.json is right."""

import json
import subprocess
import sys

import numpy as np
import pytest
from test_wandb import CLI_TINY

KEYS = ("accuracy", "nll", "brier", "ece", "uce", "mi_mean", "referral_rate_at_target", "ood_auroc")


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "qbdl.run", *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process_evaluation(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    proc = _cli(["trainer=ddp", *CLI_TINY, "logger=csv", f"hydra.run.dir={ddp_dir}"])
    text = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in text  # two processes really ran the fit
    ddp = json.loads((ddp_dir / "results.json").read_text())
    assert set(ddp["variants"]) == {"dnn", "dnn_ts", "bnn", "bnn_ts", "bnn_mean"}
    assert (ddp_dir / "predictions.npz").exists() and ddp["plots"]
    assert ddp["config"]["trainer"]["devices"] == 2
    # The same trained weights, evaluated in one process.
    _cli(
        [
            *CLI_TINY,
            "logger=none",
            f"dnn.checkpoint={ddp_dir / 'dnn.safetensors'}",
            f"bnn.checkpoint={ddp_dir / 'bnn.safetensors'}",
            "bnn.max_epochs=0",
            f"hydra.run.dir={single_dir}",
        ]
    )
    single = json.loads((single_dir / "results.json").read_text())
    for v in ("dnn", "bnn", "bnn_mean"):
        for k in KEYS:
            assert ddp["variants"][v][k] == pytest.approx(single["variants"][v][k], rel=1e-5, abs=1e-6), (
                v,
                k,
            )
        a, b = np.load(ddp_dir / "predictions.npz"), np.load(single_dir / "predictions.npz")
        np.testing.assert_allclose(a[f"{v}/pbar"], b[f"{v}/pbar"], atol=1e-5)


@pytest.mark.slow
def test_ddp_with_wandb_logger(tmp_path):
    """The spawned workers log into the main process's W&B run; media land in the run dir's offline run."""
    from test_wandb import check_wandb_run

    _cli(["trainer=ddp", *CLI_TINY, f"hydra.run.dir={tmp_path}"])
    check_wandb_run(tmp_path)
