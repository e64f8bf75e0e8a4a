"""python -m qbdl.export.bench on a tiny network: every variant timed in its worker, memory, machine, table."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from qbdl.export.bench import main  # noqa: E402


@pytest.mark.slow  # four worker processes, two of them importing torch: ~15 s quiet, ~50 s on a loaded 2-core box
def test_export_bench_writes_results(tmp_path):
    out = tmp_path / "b"
    argv = ["--arch", "resnet20", "--image-size", "8", "--in-chans", "1", "--batch-sizes", "1", "2",
            "--samples", "1", "2", "--rounds", "2", "--variants", "qbdl_qdnn", "ort_qdnn", "ort_qbnn",
            "ort_qbnn_fast", "ort_qbnn_bank", "--bank-size", "2", "--max-rows", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "bench_export.json").read_text())
    res = doc["results"]
    assert set(res) == {
        "qbdl_qdnn",
        "ort_qdnn",
        "ort_qbnn_S1",
        "ort_qbnn_S2",
        "ort_qbnn_fast_S1",
        "ort_qbnn_fast_S2",
        "ort_qbnn_bank_S1",
        "ort_qbnn_bank_S2",
    }
    assert res["ort_qbnn_S2"]["samples"] == 2 and res["ort_qbnn_S2"]["runtime"].startswith("onnxruntime")
    for r in res.values():  # --max-rows 2: S = 2 at batch 2 (4 rows) is not timed
        assert all(v > 0 for v in r["img_per_s"].values())
        assert set(r["img_per_s"]) == ({"1", "2"} if r["samples"] == 1 else {"1"})
        assert all(len(t) == 2 for t in r["seconds"].values())  # one timing per round and batch size
        assert (
            r["rss_loaded_mib"] >= r["rss_imports_mib"] > 0 and r["peak_rss_mib"] >= r["rss_loaded_mib"] - 1
        )
    # the runtime worker never imported torch: its resident memory is far below a torch process's
    assert res["ort_qdnn"]["rss_imports_mib"] < 0.5 * res["qbdl_qdnn"]["rss_imports_mib"]
    m = doc["machine"]
    assert m["cpu"] and isinstance(m["lscpu_flags"], list) and "vnni" in m
    table = (out / "bench_export.md").read_text()
    assert "| ort_qbnn_S2 | 2 |" in table and "CPU:" in table
    assert doc["bank_size"] == 2 and doc["machine"]["versions"]["onnxruntime"] and doc["command"].startswith(
        "python -m qbdl.export.bench --arch resnet20")
