"""Hydra multiruns: a seeds sweep with its summary and multi-run report, Optuna search, launcher configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_run import compose_config
from test_wandb import CLI_TINY, check_wandb_run

from qbdl.run import CONF_DIR

SUMMARY = "++hydra.callbacks.sweep_summary._target_=qbdl.pipeline.sweep.SweepSummary"


def _plus(group: str) -> str:
    """'+' for a group the primary config's defaults list does not name (append), '' when it does."""
    return "" if f"{group}:" in (Path(CONF_DIR) / "config.yaml").read_text() else "+"


def _multirun(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "qbdl.run", "-m", *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def seeds_sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("seeds")
    _multirun([f"{_plus('experiment')}experiment=seeds", "seed=0,1", *CLI_TINY, f"hydra.sweep.dir={sweep}"])
    return sweep


def test_seeds_sweep_runs_and_summarises(seeds_sweep):
    jobs = sorted(p for p in seeds_sweep.iterdir() if (p / "results.json").exists())
    assert [p.name for p in jobs] == ["0", "1"]
    seeds = [json.loads((p / "results.json").read_text())["config"]["seed"] for p in jobs]
    assert seeds == [0, 1]
    text = (seeds_sweep / "sweep_summary.md").read_text()
    assert "| job | seed | variant |" in text and "| 1 | 1 | bnn |" in text
    md = (seeds_sweep / "report.md").read_text()  # the multi-run report, written by the same callback
    assert "seeds [0, 1]" in md and "Mean ± std over seeds" in md and "bnn > dnn" in md


def test_seeds_sweep_wandb_runs_are_finished(seeds_sweep):
    for job in ("0", "1"):
        check_wandb_run(seeds_sweep / job)


def test_report_cli_on_real_sweep(seeds_sweep, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qbdl.report", str(seeds_sweep), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    (group,) = summary["groups"]
    assert group["seeds"] == [0, 1]
    acc = group["stats"]["bnn"]["accuracy"]
    runs = [json.loads((seeds_sweep / j / "results.json").read_text()) for j in ("0", "1")]
    vals = [r["variants"]["bnn"]["accuracy"] for r in runs]
    assert acc["n"] == 2 and acc["mean"] == pytest.approx(sum(vals) / 2)
    assert acc["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2**0.5)
    claim = next(c for c in group["claims"] if (c["a"], c["b"], c["metric"]) == ("bnn", "dnn", "uce"))
    d = [r["variants"]["bnn"]["uce"] - r["variants"]["dnn"]["uce"] for r in runs]
    assert claim["diffs"] == pytest.approx(d) and claim["lo"] <= claim["mean"] <= claim["hi"]
    assert (tmp_path / "report.html").exists()


@pytest.mark.slow
def test_two_point_moped_delta_sweep(tmp_path):
    _multirun(
        ["bayes.moped_delta=0.02,0.05", *CLI_TINY, "logger=csv", SUMMARY, f"hydra.sweep.dir={tmp_path}"]
    )
    deltas = [
        json.loads((tmp_path / j / "results.json").read_text())["config"]["bayes"]["moped_delta"]
        for j in "01"
    ]
    assert deltas == [0.02, 0.05]
    text = (tmp_path / "sweep_summary.md").read_text()
    assert "bayes.moped_delta" in text and "| 0 | 0.02 | bnn |" in text


def test_optuna_two_trials(tmp_path):
    proc = _multirun(
        [
            f"{_plus('hparams_search')}hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            *CLI_TINY,
            "logger=none",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and "bayes.moped_delta" in best["best_params"]
    values = [
        json.loads((tmp_path / j / "results.json").read_text())["validation"]["bnn/val/nll"] for j in "01"
    ]
    assert best["best_value"] == pytest.approx(min(values))
    assert "Best" in (tmp_path / "sweep_summary.md").read_text()
    assert proc.returncode == 0


def test_sweep_and_launcher_configs_compose(tmp_path):
    seeds = compose_config(tmp_path, [f"{_plus('experiment')}experiment=seeds"], tiny=False)
    assert str(seeds.hydra.sweeper.params.seed) == "0,1,2,3,4"
    assert seeds.hydra.callbacks.sweep_summary._target_ == "qbdl.pipeline.sweep.SweepSummary"
    opt = compose_config(tmp_path, [f"{_plus('hparams_search')}hparams_search=optuna"], tiny=False)
    assert "Optuna" in opt.hydra.sweeper._target_ and opt.hydra.sweeper.direction == "minimize"
    assert opt.hydra.sweeper.sampler.seed is not None and opt.optimize_metric == "bnn/val/nll"
    assert "bnn.optimizer.lr" in opt.hydra.sweeper.params
    slurm = compose_config(tmp_path, ["hydra/launcher=submitit_slurm"], tiny=False)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    ddp = compose_config(tmp_path, ["trainer=ddp"], tiny=False)
    assert ddp.trainer.devices == 2 and ddp.trainer.strategy.process_group_backend == "gloo"
