"""Data-shift evaluation (qbdl.experiment.shift) on a tiny real model and the embedded digits at 8x8."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

import qbdl.experiment.shift as se
from qbdl import metrics
from qbdl.bayes import dnn_to_bnn
from qbdl.data import DigitsDataModule
from qbdl.data.shift import shift_datasets
from qbdl.experiment.evaluate import Variant, predict_loader
from qbdl.io import atomic_write_json
from qbdl.report import multi
from qbdl.report.shift import shift_table
from qbdl.report.shift_plots import save_shift_plots

SEED = 7
CORRUPTIONS = ["gaussian_noise", "rotate"]
SEVERITIES = [1, 3]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=8, eval_batch_size=128)
    dm.setup()
    dnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    ).eval()
    bnn = dnn_to_bnn(dnn, moped_delta=0.2).eval()
    qbnn = copy.deepcopy(bnn)
    with torch.no_grad():
        for p in qbnn.parameters():
            p.add_(0.01 * torch.randn_like(p))
    variants = [Variant("dnn", dnn, 1, 0), Variant("bnn", bnn, 2, 0), Variant("qbnn", qbnn, 2, 0)]
    cfg = {
        "corruptions": CORRUPTIONS,
        "severities": SEVERITIES,
        "seed": 0,
        "root": None,
        "cache": True,
        "cache_dir": None,
        "max_items": 120,
    }
    sets = shift_datasets(dm, cfg)
    clean = {v.name: predict_loader(v.model, dm.test_dataloader(), v.samples, SEED)[0] for v in variants}
    y_clean = torch.cat([y for _, y in dm.test_dataloader()])
    clean_metrics = {k: metrics.summarize(torch.softmax(lg, -1), y_clean) for k, lg in clean.items()}
    return dm, variants, sets, clean, clean_metrics


def _run(setup, cache_dir=None, **kw):
    _, variants, sets, clean, clean_metrics = setup
    return se.evaluate_shift(
        variants,
        sets,
        seed=SEED,
        batch_size=50,
        n_bins=10,
        clean_logits=clean,
        cache_dir=cache_dir,
        data_key="digits-test",
        clean=clean_metrics,
        **kw,
    )


def test_schema_values_detection_table_and_plots(setup, tmp_path: Path) -> None:
    _, variants, sets, clean, clean_metrics = setup
    out = _run(setup)
    assert set(out) == {"cells", "summary", "mce", "meta"}  # bookkeeping beside the variants, not among them
    assert se.cell_results(out).keys() == {"dnn", "bnn", "qbnn"}
    cells = out["cells"]
    meta = out["meta"]
    assert meta["corruptions"] == CORRUPTIONS and meta["severities"] == SEVERITIES
    assert meta["baseline"] == "dnn" and meta["n"] == {c: {"1": 120, "3": 120} for c in CORRUPTIONS}
    for v in variants:
        assert set(cells[v.name]) == set(CORRUPTIONS)
        for c in CORRUPTIONS:
            assert set(cells[v.name][c]) == {"1", "3"}
            for m in cells[v.name][c].values():
                assert tuple(m) == se.CELL_METRICS and all(isinstance(x, float) for x in m.values())
    # a JSON round trip keeps everything (string keys, floats)
    back = json.loads(atomic_write_json(tmp_path / "shift.json", out).read_text())
    assert back["cells"]["bnn"] == cells["bnn"] and back["meta"] == out["meta"]

    # every cell equals summarize() / sklearn on the same predictions (same MC seed as the clean run)
    v = variants[1]
    c, s, ds = sets[3]  # rotate, severity 3
    logits, y, _, _ = predict_loader(v.model, torch.utils.data.DataLoader(ds, batch_size=50), 2, SEED)
    p = torch.softmax(logits, -1)
    ref = metrics.summarize(p, y, n_bins=10)
    cell = cells["bnn"][c][str(s)]
    for k in ("accuracy", "nll", "brier", "ece", "uce", "entropy_mean", "mi_mean"):
        assert cell[k] == pytest.approx(ref[k], abs=1e-12), k
    assert cell["error"] == pytest.approx(1 - ref["accuracy"])
    p_clean = torch.softmax(clean["bnn"], -1)
    labels = [0] * p_clean.shape[1] + [1] * p.shape[1]
    for key, fn in (("entropy", metrics.predictive_entropy), ("mi", metrics.mutual_information)):
        scores = torch.cat([fn(p_clean.double()), fn(p.double())]).numpy()  # float64, as qbdl.metrics
        assert cell[f"detect_auroc_{key}"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # a deterministic variant has MI = 0 everywhere: detection by MI is chance
    assert cells["dnn"][c][str(s)]["detect_auroc_mi"] == pytest.approx(0.5)
    # stronger corruption, larger shift: the gaussian-noise images are told apart from the clean ones
    assert cells["bnn"]["gaussian_noise"]["3"]["detect_auroc_entropy"] > 0.5

    # summary: box stats over corruptions; mCE against dnn (itself: 1)
    acc = [cells["qbnn"][c]["1"]["accuracy"] for c in CORRUPTIONS]
    box = out["summary"]["qbnn"]["1"]["accuracy"]
    assert box["mean"] == pytest.approx(sum(acc) / 2) and box["n"] == 2
    assert out["mce"]["dnn"]["mCE"] == pytest.approx(1.0)
    ce = {
        c: sum(cells["bnn"][c][s]["error"] for s in ("1", "3"))
        / sum(cells["dnn"][c][s]["error"] for s in ("1", "3"))
        for c in CORRUPTIONS
    }
    assert out["mce"]["bnn"]["CE"] == pytest.approx(ce)
    assert "relative_mCE" in out["mce"]["bnn"]

    text = shift_table(out)
    assert "mCE (vs dnn)" in text and "sev 3" in text and "UCE %" in text
    expected = 100 * sum(cells["bnn"][c]["3"]["accuracy"] for c in CORRUPTIONS) / 2
    assert f"{expected:.2f}" in text
    files = save_shift_plots(back, tmp_path / "plots", clean_metrics)
    assert set(files) == {
        *(f"shift_{m}" for m in ("accuracy", "ece", "uce")),
        *(f"shift_diff_qbnn_bnn_{m}" for m in ("accuracy", "ece", "uce")),
    }
    assert all(Path(f).stat().st_size > 1000 and f.endswith(".png") for f in files.values())
    assert (
        se.evaluate_shift(
            variants, [], seed=0, batch_size=1, n_bins=10, clean_logits={}, cache_dir=None, data_key=""
        )
        == {}
    )


def test_no_baseline_no_mce_and_clear_errors(setup) -> None:
    _, variants, sets, clean, _ = setup
    out = se.evaluate_shift(
        variants[1:2],
        sets[:1],
        seed=SEED,
        batch_size=64,
        n_bins=10,
        clean_logits=clean,
        cache_dir=None,
        data_key="",
    )
    assert out["mce"] == {} and out["meta"]["baseline"] is None
    assert "mCE" in shift_table(out)  # the column is there, empty
    with pytest.raises(KeyError, match="clean_logits"):
        se.evaluate_shift(
            variants, sets[:1], seed=0, batch_size=8, n_bins=10, clean_logits={}, cache_dir=None, data_key=""
        )


def test_temperature_scaled_twins(setup) -> None:
    _, variants, sets, clean, _ = setup
    kw = dict(seed=SEED, batch_size=64, n_bins=10, clean_logits=clean, cache_dir=None, data_key="")
    out = se.evaluate_shift(variants[:1], sets[:2], temperatures={"dnn": 2.0}, **kw)
    assert list(se.cell_results(out)) == ["dnn", "dnn_ts"] and "temperatures" not in out["meta"]
    c, s, ds = sets[1]
    logits, y, _, _ = predict_loader(
        variants[0].model, torch.utils.data.DataLoader(ds, batch_size=64), 1, SEED
    )
    p = torch.softmax(logits / 2.0, -1)
    cell, plain = out["cells"]["dnn_ts"][c][str(s)], out["cells"]["dnn"][c][str(s)]
    assert cell["accuracy"] == plain["accuracy"]  # T > 0 keeps the argmax
    assert cell["ece"] == pytest.approx(metrics.summarize(p, y, n_bins=10)["ece"], abs=1e-12)
    assert cell["nll"] != plain["nll"]
    p_clean = torch.softmax(clean["dnn"] / 2.0, -1).double()
    scores = torch.cat([metrics.predictive_entropy(p_clean), metrics.predictive_entropy(p.double())])
    labels = [0] * p_clean.shape[1] + [1] * p.shape[1]
    assert cell["detect_auroc_entropy"] == pytest.approx(roc_auc_score(labels, scores.numpy()), abs=1e-12)
    for bad in ({"bnn": 1.0}, {"dnn": 0.0}):
        with pytest.raises(ValueError, match="temperatures"):
            se.evaluate_shift(variants[:1], sets[:1], temperatures=bad, **kw)


def test_killed_and_resumed_equals_uninterrupted(setup, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real = se.predict_loader

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc", ""))
        if fail_at and len(calls) == fail_at:
            raise KeyboardInterrupt  # killed in the middle of the 5th cell
        return real(*args, **kwargs)

    monkeypatch.setattr(se, "predict_loader", counting)
    fail_at = None
    full = _run(setup)  # uninterrupted, no cache
    assert len(calls) == 12  # 3 variants x 2 corruptions x 2 severities
    cache = tmp_path / "cache"
    calls.clear()
    fail_at = 5
    with pytest.raises(KeyboardInterrupt):
        _run(setup, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 4 and not list(cache.glob(".*tmp"))
    calls.clear()
    fail_at = None
    resumed = _run(setup, cache_dir=cache)
    assert len(calls) == 8  # only the missing cells
    assert resumed == full
    # everything cached: nothing predicted
    calls.clear()
    assert _run(setup, cache_dir=cache) == full and calls == []
    # one cell's file deleted, another corrupt: those two are redone (the corrupt one with a warning)
    files = sorted(cache.glob("*.safetensors"))
    (gone,) = [f for f in files if f.name.startswith("bnn-rotate-1-")]
    (bad,) = [f for f in files if f.name.startswith("qbnn-gaussian_noise-3-")]
    gone.unlink()
    bad.write_bytes(bad.read_bytes()[:100])
    calls.clear()
    with pytest.warns(RuntimeWarning, match="not usable"):
        again = _run(setup, cache_dir=cache)
    assert sorted(calls) == ["shift gaussian_noise/3 qbnn", "shift rotate/1 bnn"]
    assert again == full
    # other MC seed: other files
    calls.clear()
    _, variants, sets, clean, _ = setup
    se.evaluate_shift(
        variants[:1],
        sets[:1],
        seed=SEED + 1,
        batch_size=50,
        n_bins=10,
        clean_logits=clean,
        cache_dir=cache,
        data_key="digits-test",
    )
    assert len(calls) == 1


def _shift_result(qbnn_minus_bnn: float) -> dict:
    cell = lambda a: {"accuracy": a, "ece": 0.1 - a / 10, "uce": 0.05}  # noqa: E731
    bnn = {c: {"1": cell(0.8 - 0.1 * k), "3": cell(0.6 - 0.1 * k)} for k, c in enumerate(CORRUPTIONS)}
    qbnn = {c: {s: cell(m["accuracy"] + qbnn_minus_bnn) for s, m in per.items()} for c, per in bnn.items()}
    # the shape results.json had before "cells"/"summary"/"mce"/"meta": older sweeps still report
    return {"bnn": bnn, "qbnn": qbnn, "_summary": {}, "_mce": {}, "_meta": {}}


def test_multi_seed_report_has_a_data_shift_section(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for i, d in enumerate((-0.01, -0.02, -0.03)):
        run = sweep / str(i)
        run.mkdir(parents=True)
        cfg = {"seed": i, "eval": {"seed": i}, "shift": {"seed": i, "corruptions": CORRUPTIONS}}
        variants = {"bnn": {"accuracy": 0.9}, "qbnn": {"accuracy": 0.9 + d}}
        res = {"variants": variants, "config": cfg, "plots": {}, "shift": _shift_result(d)}
        (run / "results.json").write_text(json.dumps(res))
    runs = multi.load_runs([sweep])
    (group,) = multi.group_runs(runs)  # shift.seed follows the seed: one group
    cl = multi.shift_claims(group)
    assert sorted(cl) == [1, 3]
    acc, ece, uce = cl[3]
    assert acc.diffs == pytest.approx([-0.01, -0.02, -0.03]) and acc.mean == pytest.approx(-0.02)
    assert acc.sd == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert (acc.lo, acc.hi) == pytest.approx((-0.02 - half, -0.02 + half))
    assert ece.mean == pytest.approx(0.002) and uce.mean == pytest.approx(0.0) and uce.sd == 0.0
    md = multi.render_markdown(runs)
    assert "### Data shift: qbnn - bnn (paired over seeds)" in md
    assert "-2 ± 1" in md  # accuracy in %
    assert "<h3>Data shift: qbnn - bnn (paired over seeds)</h3>" in multi.render_html(runs)
    # runs without shift results: no section (existing behaviour)
    for p in sweep.iterdir():
        r = json.loads((p / "results.json").read_text())
        r.pop("shift")
        (p / "results.json").write_text(json.dumps(r))
    assert "Data shift" not in multi.render_markdown(multi.load_runs([sweep]))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["shift.corruptions=[nosuch]", "shift.severities=[1]"], "nosuch"),
        (["shift.corruptions=[gaussian_noise]", "shift.severities=[6]"], "6"),
        (["shift.corruptions=[saturate]", "shift.severities=[1]"], "saturate"),  # RGB-only, digits are gray
    ],
)
def test_bad_shift_config_fails_at_start_up_before_any_training(tmp_path, overrides, match):
    from helpers_run import compose_config

    from qbdl.pipeline.run import run

    with pytest.raises(ValueError, match=match):
        run(compose_config(tmp_path, overrides))
    assert not (tmp_path / "dnn.safetensors").exists() and not (tmp_path / "checkpoints").exists()
