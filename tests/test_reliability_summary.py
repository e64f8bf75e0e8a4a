"""The record helper and the README renderer (scripts/reliability_summary.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import reliability_log

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reliability_summary.py"


def _script():
    spec = importlib.util.spec_from_file_location("reliability_summary", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_records_render_and_replace_between_markers(tmp_path, monkeypatch):
    log = tmp_path / "r.jsonl"
    monkeypatch.setenv("QBDL_RELIABILITY_LOG", str(log))
    reliability_log.record("t_a", "fuzzing", "x | y", "f", 3, "old")
    reliability_log.record("t_a", "fuzzing", "x | y", "f", 5, "ok")  # replaces the first
    reliability_log.record("t_b", "interruption", "run", "SIGKILL", 2, "resumed")
    with open(log, "a") as fh:
        fh.write('{"torn": ')  # a killed writer's partial line is ignored
    mod = _script()
    recs = mod.read_records(log)
    assert [r["count"] for r in recs] == [5, 2]
    md = mod.render(recs)
    assert md.index("Interrupted runs") < md.index("Fuzzing")  # fixed category order
    assert "x \\| y" in md and "| 5 |" in md and "7 trials" in md
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\ntext\n")
    mod.update_readme(readme, md)
    mod.update_readme(readme, md)  # idempotent: one block, replaced in place
    text = readme.read_text()
    assert text.startswith("# Title\n\ntext\n") and text.count(mod.BEGIN) == 1 and text.count(mod.END) == 1
    assert json.loads(log.read_text().splitlines()[0])["test"] == "t_a"
