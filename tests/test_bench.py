"""The benchmark CLI: records, Table-1 markdown and plots (tiny model; speed targets live in the bench, not here)."""

import json
import subprocess
import sys

VARIANTS = {"dnn_fp32", "dnn_int8", "bnn_fp32", "bnn_fp32_bank", "qbnn_int8_fresh", "qbnn_int8_bank"}


def test_bench_cli_writes_json_markdown_plots(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qbdl.bench",
            "arch=resnet20",
            "image_size=16",
            "in_chans=1",
            "num_classes=10",
            "batch_sizes=[1,4]",
            "mc_samples=2",
            "reps=3",
            "warmup=1",
            "bank_size=2",
            "bf16=true",
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    recs = report["results"]
    assert {r["variant"] for r in recs} == VARIANTS | {"dnn_bf16"}
    assert {r["batch_size"] for r in recs} == {1, 4} and all(r["mc_samples"] == 2 for r in recs)
    for r in recs:
        assert r["images_per_s"] > 0 and r["min_s"] <= r["median_s"] <= r["max_s"] and r["reps"] >= 3
        assert r["images_per_s"] == r["batch_size"] / r["median_s"]
    by = {(r["variant"], r["batch_size"]): r for r in recs}
    assert by[("dnn_int8", 4)]["speedup_vs_dnn_int8"] == 1.0
    # int8 weights on disk: <= 0.27x of the FP32 BNN's file (fresh sampler; the bank is redrawn from its seed)
    assert by[("qbnn_int8_fresh", 1)]["size_bytes"] <= 0.27 * by[("bnn_fp32", 1)]["size_bytes"]
    assert report["machine"]["threads"] == 2 and "avx512_vnni" in report["machine"]
    # each variant's resident memory, measured alone in a subprocess (qbdl.bench.resident_memory)
    assert all(r["resident_bytes"] and r["resident_bytes"] > 0 for r in recs)
    assert by[("qbnn_int8_fresh", 1)]["resident_vs_bnn_fp32"] > 0
    md = (out / "bench.md").read_text()
    assert "| batch size | BNN FP32" in md and "qbnn_int8_bank" in md and "resident MiB (vs FP32 BNN)" in md
    for png in ("throughput.png", "speedup.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
