"""The experiment pipeline end to end: real Hydra compose, real Trainer, real quantized kernels."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers_run import compose_config

from qbdl.pipeline.run import run

KEYS = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "uce",
    "mi_mean",
    "referral_rate_at_target",
    "ood_auroc",
    "size_bytes",
    "images_per_s",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = run(compose_config(out))
    return out, results


def test_run_writes_results_report_predictions_plots(tiny_run):
    out, results = tiny_run
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["variants"]) == {"dnn", "qdnn", "bnn", "bnn_mean", "qbnn"} | {
        f"{v}_ts" for v in ("dnn", "qdnn", "bnn", "qbnn")
    }
    t = on_disk["temperatures"]  # stored once: not beside each variant's metrics
    assert set(t) == {k for k in on_disk["variants"] if k.endswith("_ts")} and min(t.values()) > 0
    assert not any("temperature" in v for v in on_disk["variants"].values())
    assert on_disk["variants"]["dnn"]["ood"]["rotated"]["group"] == "near"  # eval.ood_groups
    for name, res in on_disk["variants"].items():
        for key in KEYS:
            assert res[key] is not None, (name, key)
        assert 0.0 <= res["accuracy"] <= 1.0 and res["nll"] > 0 and res["size_bytes"] > 0
        assert set(res["ood"]) == {"photos", "rotated"}
        assert res["ood_auroc"] == res["ood"]["photos"]["auroc"]
    assert on_disk["variants"]["bnn"]["samples"] == 2 and on_disk["variants"]["dnn"]["samples"] == 1
    # int8 weights: the quantized models' files are much smaller than the FP32 ones
    v = on_disk["variants"]
    assert v["qbnn"]["size_bytes"] < 0.3 * v["bnn"]["size_bytes"]
    assert v["qdnn"]["size_bytes"] < 0.3 * v["dnn"]["size_bytes"]
    assert on_disk["config"]["seed"] == 0 and on_disk["versions"]["torch"]
    html = (out / "report.html").read_text()
    assert "qbnn" in html and "<table>" in html and ".png" in html
    pred = np.load(out / "predictions.npz")
    n = v["bnn"]["n_test"]
    assert pred["bnn/pbar"].shape == (n, 10)
    np.testing.assert_allclose(pred["bnn/pbar"].sum(1), 1.0, atol=1e-5)
    acc = (pred["bnn/pbar"].argmax(1) == pred["bnn/target"]).mean()
    assert acc == pytest.approx(v["bnn"]["accuracy"], abs=1e-6)
    for p in on_disk["plots"].values():
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    for f in ("dnn.safetensors", "bnn.safetensors", "models/qbnn.qbdl", "models/qdnn.qbdl", "splits.json"):
        assert (out / f).exists(), f
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])


def test_bnn_mean_is_deterministic_and_differs_from_bnn(tiny_run):
    _, results = tiny_run
    v = results["variants"]
    assert v["bnn_mean"]["mi_mean"] == pytest.approx(0.0, abs=1e-7)  # one sample: no epistemic part
    assert v["bnn"]["mi_mean"] > 0


def test_later_stage_starts_from_earlier_output(tiny_run, tmp_path):
    out, first = tiny_run
    cfg = compose_config(
        tmp_path,
        [
            f"dnn.checkpoint={out / 'dnn.safetensors'}",
            "bnn.max_epochs=0",
            f"bnn.checkpoint={out / 'bnn.safetensors'}",
            "eval.variants=[dnn,bnn_mean]",
        ],
    )
    res = run(cfg)
    for name in ("dnn", "bnn_mean"):  # same weights, deterministic variants -> identical metrics
        assert res["variants"][name]["accuracy"] == first["variants"][name]["accuracy"]
        assert res["variants"][name]["nll"] == pytest.approx(first["variants"][name]["nll"], rel=1e-6)


def test_bad_config_gives_clear_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="nosuchgroup|Could not find"):
        compose_config(tmp_path, ["+experiment=nosuchgroup"])
    cfg = compose_config(tmp_path, ["eval.builtin_ood=[photos,noise]"])
    with pytest.raises(ValueError, match="builtin_ood"):
        run(cfg)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qbdl.run",
            "quant.backend=nosuch",
            "dnn.max_epochs=0",
            "bnn.max_epochs=0",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "nosuch" in text and "backend" in text


def test_start_up_estimate_is_kept_beside_the_actual_times(tiny_run):
    _, res = tiny_run
    est = res["estimate"]
    assert set(est["seconds"]["evaluation"]) == {"dnn", "qdnn", "bnn", "bnn_mean", "qbnn"}
    assert min(est["seconds"]["evaluation"].values()) > 0 and est["seconds"]["calibration"] > 0
    assert est["seconds"]["dnn_fit"] > 0 and est["seconds"]["bnn_fit"] > 0
    assert est["images"]["test"] == res["variants"]["bnn"]["n_test"]
    # the probe's per-image forward time against the evaluation's own measurement of the same variant
    for v in ("dnn", "bnn", "qbnn"):
        r = res["variants"][v]
        actual = r["eval_seconds"] / (r["timed_images"] * r["samples"])
        assert 0.1 < est["per_image_forward"][v] / actual < 10, (v, est["per_image_forward"][v], actual)


def test_estimate_arithmetic(monkeypatch):
    """Every probe timed at 1 s: the estimate is the run's counts times that, exactly."""
    from qbdl.experiment import estimate as E
    from qbdl.models import resnet20

    assert [E.limited(10, lim) for lim in (None, 4, 0.5, 1.0, 30)] == [10, 4, 5, 10, 10]
    monkeypatch.setattr(E, "_seconds", lambda fn, reps=2: 1.0)
    est = E.estimate_run(
        dnn=resnet20(10, 1), train_batch=(torch.randn(4, 1, 16, 16), torch.arange(4)),
        eval_batch=torch.randn(8, 1, 16, 16), n_train=100, dnn_steps=6, bnn_steps=3, val_images=40,
        val_mc_samples=2, bayes={}, quant_options=None, quantize_dnn=False,
        variants=["dnn", "bnn", "bnn_ts", "qbnn"], mc_samples=4,
        images={"test": 80, "ood": 20, "val": 16, "shift": 0},
    )  # fmt: skip
    s = est["seconds"]
    assert s["dnn_fit"] == 6 and s["bnn_fit"] == 3 + (1 / 8) * 2 * 40 and s["calibration"] == 0
    assert s["evaluation"] == {"dnn": 100 / 8, "bnn": 4 * (100 + 16) / 8}  # no qbnn without PTQ
    assert s["total"] == 6 + 13 + 12.5 + 58
