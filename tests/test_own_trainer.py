"""The docs' example (docs/library.md): qbdl's PTQ and evaluation callbacks in a user's own Trainer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

PAGE = Path(__file__).resolve().parents[1] / "docs" / "library.md"


def _example() -> str:
    text = PAGE.read_text()
    m = re.search(r"<!-- example: own-trainer -->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/library.md lost its own-trainer example"
    return m.group(1)


def test_readme_example_in_a_plain_trainer(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _example()], cwd=tmp_path, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    res = json.loads((run / "results.json").read_text())
    assert list(res["variants"]) == ["bnn", "bnn_ts", "bnn_mean", "qbnn"]
    assert not (run / "evaluation.json").exists()  # one results file, written once
    # the numbers are those of the saved predictions, not a copy of something else
    pred = np.load(run / "predictions.npz")
    for v, r in res["variants"].items():
        acc = float((pred[f"{v}/pbar"].argmax(-1) == pred[f"{v}/target"]).mean())
        assert r["accuracy"] == acc and r["n_test"] == 397
        assert 0.5 < r["ood"]["noise"]["auroc"] <= 1.0
    assert res["variants"]["bnn"]["accuracy"] > 0.8  # the module really trained
    assert res["temperatures"]["bnn_ts"] > 0 and "temperature" not in res["variants"]["bnn_ts"]  # stored once
    assert res["variants"]["qbnn"]["size_bytes"] == (run / "models" / "qbnn.qbdl").stat().st_size
    assert res["variants"]["qbnn"]["samples"] == 8 and res["variants"]["qbnn"]["device"] == "cpu"
    assert res["quantization_seconds"]["qbnn"] > 0
    # outside qbdl.run the config records the callbacks' own settings
    assert res["config"]["quant"]["observer"] == "histogram" and res["config"]["quant"]["calib_batches"] == 4
    assert res["config"]["eval"]["mc_samples"] == 8 and res["config"]["eval"]["ood"] == ["noise"]
    assert res["data"] == {
        "name": "Digits", "n_train": 1200, "num_classes": None, "ood_sets": ["noise"],
        "bad_files": [], "n_bad_files": 0,
    }  # fmt: skip
    assert set(res["timings"]) == {"bnn_fit", "ptq", "evaluation", "evaluation_ranks"}
    for name, path in res["plots"].items():
        assert (tmp_path / path).is_file(), name  # relative to where the user ran it
    assert "qbnn" in (run / "report.html").read_text()
