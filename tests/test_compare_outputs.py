"""scripts/compare_outputs.py: old and new results shapes compare equal; a changed number, a missing file show."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_outputs.py"
spec = importlib.util.spec_from_file_location("compare_outputs", SCRIPT)
co = importlib.util.module_from_spec(spec)
spec.loader.exec_module(co)


def _tree(root: Path, results: dict) -> Path:
    for rel in ("run", "sweep/0", "sweep/1"):
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "results.json").write_text(json.dumps(results))
    (root / "run" / "fidelity.json").write_text(
        json.dumps({"gap": 0.5, "seconds": 9.0, "run_dir": str(root)})
    )
    (root / "sweep" / "summary.json").write_text("{}")
    for name in ("report.md", "sweep_summary.md"):
        (root / "sweep" / name).write_text(f"| accuracy % | 99.0 |\n| img/s | {len(str(root))} |\n")
    return root


OLD = {
    "variants": {
        "bnn": {"accuracy": 0.9, "images_per_s": 10.0},
        "bnn_ts": {"accuracy": 0.9, "temperature": 1.5},
    },
    "temperatures": {"bnn_ts": 1.5},
    "shift": {"bnn": {"rotate": {"1": {"accuracy": 0.5}}}, "_summary": {}, "_mce": {}, "_meta": {"n": 3}},
    "timings": {"dnn": 3.0},
}
NEW = {
    "variants": {"bnn": {"accuracy": 0.9, "images_per_s": 99.0}, "bnn_ts": {"accuracy": 0.9}},
    "temperatures": {"bnn_ts": 1.5},
    "shift": {
        "cells": {"bnn": {"rotate": {"1": {"accuracy": 0.5}}}},
        "summary": {},
        "mce": {},
        "meta": {"n": 3},
    },
    "timings": {"dnn": 4.0},
}


def test_same_numbers_in_either_shape_compare_equal(tmp_path: Path, capsys) -> None:
    assert co.compare(_tree(tmp_path / "a", OLD), _tree(tmp_path / "bb", NEW)) == 0
    assert "0 difference(s)" in capsys.readouterr().out


def test_a_changed_number_and_a_missing_file_are_reported(tmp_path: Path, capsys) -> None:
    changed = json.loads(json.dumps(NEW))
    changed["shift"]["cells"]["bnn"]["rotate"]["1"]["accuracy"] = 0.6
    after = _tree(tmp_path / "b", changed)
    (after / "sweep" / "summary.json").unlink()
    assert co.compare(_tree(tmp_path / "a", NEW), after) == 4  # the run and both sweep jobs, the file
    out = capsys.readouterr().out
    assert "run/results.json/shift/cells/bnn/rotate/1/accuracy: 0.5 -> 0.6" in out
    assert "sweep/summary.json: missing on the after side" in out
