"""scripts/calibration_study.py as a user runs it, on a tiny finished run: every recipe's gap to the same BNN."""

import json
import os
import subprocess
import sys
from pathlib import Path

from test_fidelity import _bnn, _data, write_run_dir

from qbdl.quant import quantize_bnn

ROOT = Path(__file__).resolve().parents[1]


def test_calibration_study_on_a_run_directory(tmp_path):
    bnn = _bnn()
    write_run_dir(tmp_path, bnn, quantize_bnn(bnn, [_data(32, 1)], mc_samples=2, observer="minmax"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "calibration_study.py"), str(tmp_path), "--floor-seeds", "2"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "calibration_study.json").read_text())
    names = [r["recipe"] for r in out["recipes"]]
    assert names[0] == "run's recipe" and "QAT fine-tune, 3 epochs" in names
    for r in out["recipes"]:
        assert r["gap"] == {k: r["metrics"][k] - out["bnn"][k] for k in out["bnn"]}
    qat = next(r for r in out["recipes"] if r["recipe"].startswith("QAT"))
    assert qat["options"]["qat_epochs"] == 3 and qat["metrics"] != out["recipes"][0]["metrics"]
    control = next(r for r in out["recipes"] if r["recipe"].startswith("FP32 fine-tune control"))
    assert control["options"]["fake_quant"] is False and control["metrics"] != qat["metrics"]
    assert all(v >= 0 for v in out["mc_floor"].values()) and out["mc_samples"] == 2
    assert out["machine"]["isa"]  # the figures name the CPU they came from
    md = (tmp_path / "calibration_study.md").read_text()
    assert "MC noise floor" in md and "QAT fine-tune" in md
