"""The metric registry: every summarize() value is declared, and the table / seed report / claims read it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import qbdl.metrics as M
from qbdl.metrics import registry
from qbdl.report import multi
from qbdl.report.table import format_table, table_rows


def _small_summary() -> dict:
    g = torch.Generator().manual_seed(0)
    s, b, c = 3, 40, 4
    probs = lambda n, t: torch.softmax(t * torch.randn(s, n, c, generator=g, dtype=torch.float64), -1)  # noqa: E731
    p, y = probs(b, 2.0), torch.randint(0, c, (b,), generator=g)
    ood = {"photos": probs(30, 0.5), "rotated": probs(20, 1.0)}
    logits = torch.randn(s, b, c, generator=g)
    ood_logits = {k: torch.randn(s, v.shape[1], c, generator=g) for k, v in ood.items()}
    return M.summarize(
        p,
        y,
        ood=ood,
        logits=logits,
        ood_logits=ood_logits,
        ood_groups={"photos": "far", "rotated": "near"},
    )


def _numeric_leaves(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_numeric_leaves(v, key))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = v
    return out


def test_every_numeric_summary_value_has_a_registry_entry():
    res = _small_summary()
    assert tuple(res) == registry.summary_keys() == M.SUMMARY_KEYS
    leaves = _numeric_leaves(res)
    # every nesting the docstring promises is present in this small case
    for pattern in (
        "risk_at_coverage.",
        "coverage_at_risk.",
        "ood.photos.",
        ".scores.energy.",
        "ood_groups.near.",
    ):
        assert any(pattern in k for k in leaves), pattern
    missing = [k for k in leaves if registry.find_metric(k) is None]
    assert not missing, f"summarize() values without a registry entry: {missing}"
    for key in leaves:
        spec = registry.find_metric(key)
        assert spec.key == key and spec.label and spec.better in ("higher", "lower", None)
        assert spec.shape == "value" and spec.source == "summary"


def test_registry_entries_are_well_formed_and_nested_keys_resolve():
    for table in (registry.METRICS, registry.OOD_SET_METRICS, registry.OOD_SCORE_METRICS):
        for key, spec in table.items():
            assert spec.key == key and spec.label and spec.scale > 0 and spec.decimals >= 0
            assert spec.better in ("higher", "lower", None)
    assert set(registry.table_keys()) <= set(registry.METRICS) and set(multi.seed_metrics()) <= set(registry.METRICS)
    assert M.OOD_KEYS[:-3] == tuple(registry.OOD_SET_METRICS)
    assert M.OOD_METRIC_KEYS == tuple(registry.OOD_SCORE_METRICS)
    auroc = registry.find_metric("ood.photos.auroc")
    assert (auroc.label, auroc.better, auroc.scale) == ("OOD AUROC (photos)", "higher", 1.0)
    assert registry.find_metric("ood.photos.fpr95").better == "lower"
    assert registry.find_metric("ood.photos.scores.mi.aupr_in").label == "OOD AUPR-in (photos, mi)"
    assert registry.find_metric("ood_groups.near.energy.fpr95").better == "lower"
    risk = registry.find_metric("risk_at_coverage.0.9")
    assert risk.better == "lower" and risk.scale == 100.0 and risk.label.endswith("@90")
    assert registry.find_metric("coverage_at_risk.0.01").better == "higher"
    for unknown in (
        "nosuch",
        "ood.photos.nosuch",
        "ood.photos.score",
        "risk_at_coverage.x",
        "ood_groups.near",
    ):
        assert registry.find_metric(unknown) is None, unknown
    plain = registry.metric_spec("nosuch")
    assert (plain.label, plain.better, plain.scale) == ("nosuch", None, 1.0)


def test_the_table_takes_titles_and_formats_from_the_registry(monkeypatch):
    variants = {"bnn": {"uce": 0.01234, "nll": 0.5, "size_bytes": 3 * 2**20}}
    header, rows = table_rows(variants)
    assert header[registry.table_keys().index("uce") + 1] == "UCE %" and rows[0][registry.table_keys().index("uce") + 1] == "1.23"
    spec = registry.METRICS["uce"]
    monkeypatch.setitem(registry.METRICS, "uce", replace(spec, label="UCE ‰", scale=1000.0, decimals=1))
    header, rows = table_rows(variants)
    assert header[registry.table_keys().index("uce") + 1] == "UCE ‰" and rows[0][registry.table_keys().index("uce") + 1] == "12.3"
    assert "UCE ‰" in format_table(variants) and "12.3" in format_table(variants)
    # the short column heading wins over the label
    monkeypatch.setitem(registry.METRICS, "nll", replace(registry.METRICS["nll"], column="nll!"))
    assert "nll!" in table_rows(variants)[0]


def _runs(tmp_path: Path, uce_bnn_minus_dnn=(-0.02, -0.021, -0.019)) -> list[multi.Run]:
    for i, d in enumerate(uce_bnn_minus_dnn):
        run = tmp_path / str(i)
        run.mkdir()
        variants = {
            "dnn": {"uce": 0.05, "nll": 0.3, "ood_auroc": 0.7},
            "bnn": {"uce": 0.05 + d, "nll": 0.25 + 0.01 * i, "ood_auroc": 0.7},
        }
        cfg = {"seed": i, "eval": {"seed": i}}
        (run / "results.json").write_text(json.dumps({"variants": variants, "config": cfg}))
    return multi.load_runs([tmp_path])


def test_the_seed_report_takes_titles_and_scales_from_the_registry(tmp_path, monkeypatch):
    (group,) = multi.group_runs(_runs(tmp_path))
    header, rows = multi.stats_rows(group)
    col = header.index("NLL")
    assert rows[1][0] == "bnn" and rows[1][col] == "0.26 ± 0.01"
    monkeypatch.setitem(
        registry.METRICS, "nll", replace(registry.METRICS["nll"], label="NLL (mnats)", scale=1e3)
    )
    header, rows = multi.stats_rows(group)
    assert "NLL" not in header and rows[1][header.index("NLL (mnats)")] == "260 ± 10"
    assert "NLL (mnats)" in multi.render_markdown(multi.load_runs([tmp_path]))


def test_paired_claim_directions_come_from_the_registry(tmp_path, monkeypatch):
    (group,) = multi.group_runs(_runs(tmp_path))
    c = multi.paired_claim(group, "bnn", "dnn", "uce")
    assert c.better == "lower" and c.kind == "superiority" and c.verdict == "supported"
    assert multi.claim_rows([c])[1][0][:2] == ["bnn < dnn", "UCE %"]
    monkeypatch.setitem(registry.METRICS, "uce", replace(registry.METRICS["uce"], better="higher"))
    c = multi.paired_claim(group, "bnn", "dnn", "uce")
    assert c.better == "higher" and c.verdict == "contradicted (opposite sign)"
    assert multi.claim_rows([c])[1][0][0] == "bnn > dnn"
    monkeypatch.setitem(registry.METRICS, "uce", replace(registry.METRICS["uce"], better=None))
    c = multi.paired_claim(group, "bnn", "dnn", "uce")
    assert c.kind == "difference" and c.verdict == "supported (bnn lower)"
    # the paper's claims (claims()) go through the same lookup
    cl = {(x.a, x.b, x.metric): x for x in multi.claims(group)}
    assert cl["bnn", "dnn", "uce"].kind == "difference"


def test_the_sweep_table_takes_titles_and_formats_from_the_registry(tmp_path, monkeypatch):
    runs = _runs(tmp_path)
    header, rows = multi.sweep_rows(runs)
    assert "UCE %" in header and rows[0][header.index("UCE %")] == "5.00"  # dnn
    monkeypatch.setitem(registry.METRICS, "uce", replace(registry.METRICS["uce"], label="UCE", scale=1.0))
    header, rows = multi.sweep_rows(runs)
    assert rows[0][header.index("UCE")] == "0.05"


def test_the_registry_imports_without_lightning_or_hydra():
    code = (
        "import sys, qbdl.metrics.registry, qbdl.report.table\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("key", ["accuracy", "ood_near_auroc", "size_bytes", "images_per_s"])
def test_table_and_seed_report_agree_on_scale(key):
    spec = registry.METRICS[key]
    assert spec.format(1.0) == f"{spec.scale:.{spec.decimals}f}"
    assert multi.format_stat(multi.Stat(1.0, None, 1), key) == spec.compact(1.0)
