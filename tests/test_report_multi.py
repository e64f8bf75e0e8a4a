"""Multi-run report: grouping by seed, mean ± std, paired-difference claims with t intervals (hand-made runs)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qbdl.report import multi

T_975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), 3 seeds


def _variant(acc, nll, uce, ref, auroc, photos=None):
    return {
        "accuracy": acc,
        "nll": nll,
        "brier": 0.1,
        "ece": 0.02,
        "uce": uce,
        "mi_mean": 0.01,
        "referral_rate_at_target": ref,
        "ood_auroc": auroc,
        "ood": {"photos": {"auroc": auroc if photos is None else photos}},
        "size_bytes": 2**20,
        "images_per_s": 1000.0,
    }


def _write(path, seed, variants, delta=0.05):
    path.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "bayes": {"moped_delta": delta},
        "eval": {"seed": seed, "target_accuracy": 0.995},
        "quant": {"seed": seed, "out_dir": str(path / "models")},
        "paths": {"output_dir": str(path)},
        "data": {"seed": 0},
    }
    (path / "results.json").write_text(json.dumps({"variants": variants, "config": cfg, "plots": {}}))


@pytest.fixture
def hand_made(tmp_path):
    """3 seeds of one config (in a Hydra-multirun-like dir) + 1 run of another config.

    Paired differences bnn - dnn: OOD AUROC 0.1, 0.2, 0.3 (mean 0.2, sd 0.1 -> CI straddles 0);
    UCE -0.019, -0.020, -0.021 (mean -0.02, sd 0.001 -> supported, lower is better);
    referral +0.09, +0.10, +0.11 (contradicted). qbnn - bnn accuracy: -0.01, -0.01, -0.01 + tiny noise.
    """
    sweep = tmp_path / "multirun"
    for i, seed in enumerate((0, 1, 2)):
        dnn = _variant(0.90, 0.30, 0.05, 0.30, 0.70)
        bnn = _variant(0.90 + 0.02 * i, 0.25, 0.05 - 0.019 - 0.001 * i, 0.39 + 0.01 * i, 0.80 + 0.1 * i)
        bnn_mean = _variant(0.90, 0.28, 0.04, 0.35, 0.75)
        qbnn = dict(bnn, accuracy=bnn["accuracy"] - 0.01 - 0.0001 * i)
        _write(sweep / str(i), seed, {"dnn": dnn, "bnn": bnn, "bnn_mean": bnn_mean, "qbnn": qbnn})
    _write(tmp_path / "other", 0, {"dnn": _variant(0.8, 0.5, 0.1, 0.5, 0.6)}, delta=0.2)
    return sweep, tmp_path / "other"


def test_groups_by_seed_and_mean_std(hand_made):
    sweep, other = hand_made
    runs = multi.load_runs([sweep, other])
    assert [r.path.name for r in runs] == ["0", "1", "2", "other"]
    groups = multi.group_runs(runs)
    assert [len(g.runs) for g in groups] == [3, 1]
    assert groups[0].seeds == [0, 1, 2]
    assert groups[0].label == "bayes.moped_delta=0.05" and groups[1].label == "bayes.moped_delta=0.2"
    st = multi.seed_stats(groups[0])
    acc = st["bnn"]["accuracy"]
    assert acc.n == 3 and acc.mean == pytest.approx(0.92) and acc.std == pytest.approx(0.02)
    assert st["dnn"]["nll"].std == pytest.approx(0.0)
    assert multi.format_stat(acc, "accuracy") == "92 ± 2"


def test_paired_claims_with_t_interval(hand_made):
    sweep, _ = hand_made
    (g,) = multi.group_runs(multi.load_runs([sweep]))
    cl = {(c.a, c.b, c.metric): c for c in multi.claims(g)}
    auroc = cl["bnn", "dnn", "ood_auroc"]
    assert auroc.diffs == pytest.approx([0.1, 0.2, 0.3])
    assert auroc.mean == pytest.approx(0.2) and auroc.sd == pytest.approx(0.1)
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert (auroc.lo, auroc.hi) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert auroc.verdict == "not supported"
    uce = cl["bnn", "dnn", "uce"]
    assert uce.mean == pytest.approx(-0.02) and uce.sd == pytest.approx(0.001)
    assert uce.hi == pytest.approx(-0.02 + T_975_2 * 0.001 / math.sqrt(3))
    assert uce.verdict == "supported"
    assert cl["bnn", "dnn", "referral_rate_at_target"].verdict.startswith("contradicted")
    assert cl["bnn", "dnn", "ood.photos.auroc"].mean == pytest.approx(0.2)
    assert ("bnn", "bnn_mean", "uce") in cl
    q = cl["qbnn", "bnn", "accuracy"]
    # -1.01 pt on every seed: outside the 0.5 pt margin, and clearly not 0
    assert q.mean == pytest.approx(-0.0101) and q.kind == "equivalence" and q.margin == 0.005
    assert q.verdict == "different"
    assert cl["qbnn", "bnn", "nll"].verdict == "equivalent within ±0.01"  # identical: d = 0 on every seed
    assert cl["qbnn", "bnn", "size_bytes"].kind == "difference"  # no margin: the two-sided test only
    assert {m for a, b, m in cl if a == "qbnn"} == set(multi.seed_metrics())


def _group(diffs, metric="accuracy", margin=None, devices=("cpu", "cpu")):
    runs = []
    for i, d in enumerate(diffs):
        cfg = {"seed": i, "eval": {"equivalence": {} if margin is None else {metric: margin}}}
        variants = {
            "qbnn": {metric: 0.5 + d, "device": devices[0]},
            "bnn": {metric: 0.5, "device": devices[1]},
        }
        runs.append(multi.Run(Path(f"r{i}"), {"variants": variants, "config": cfg}))
    return multi.Group(runs)


def test_tost_equals_its_definition_and_the_90_percent_interval():
    from scipy import stats

    diffs = [0.001, -0.002, 0.0005, 0.002, -0.001]
    m, sd, n = sum(diffs) / 5, multi.mean_std(diffs).std, 5
    se = sd / math.sqrt(n)
    want = max(stats.t.sf((m + 0.005) / se, n - 1), stats.t.cdf((m - 0.005) / se, n - 1))
    assert multi.tost_p(diffs, 0.005) == pytest.approx(want, rel=1e-12)
    # TOST at 0.05 <=> the 90% t interval lies inside the margin: check both sides of the boundary
    half90 = stats.t.ppf(0.95, n - 1) * se
    edge = abs(m) + half90
    assert multi.tost_p(diffs, edge * 1.001) < 0.05 < multi.tost_p(diffs, edge * 0.999)
    c = multi.paired_claim(_group(diffs), "qbnn", "bnn", "accuracy", better=None, margin=0.005)
    assert c.verdict == "equivalent within ±0.5"
    # the same mean with 4x the spread: a wide interval is "not shown equivalent", not "keeps"
    wide = [4 * d for d in diffs]
    c = multi.paired_claim(_group(wide), "qbnn", "bnn", "accuracy", better=None, margin=0.005)
    assert c.verdict == "not shown equivalent" and c.p > 0.05


def test_margins_come_from_the_config_and_holm_adjusts():
    g = _group([0.011, 0.012, 0.009], metric="ece", margin=0.02)
    assert multi.margins(g)["ece"] == 0.02 and multi.margins(g)["accuracy"] == 0.005
    (c,) = [c for c in multi.claims(g) if c.metric == "ece"]
    assert c.margin == 0.02 and c.verdict.startswith("equivalent within")
    assert multi.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert multi.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    cl = multi.claims(g, holm_correction=True)
    tested = [c for c in cl if c.p is not None]
    assert all(c.p_adj >= c.p for c in tested) and max(c.p_adj for c in tested) <= 1.0
    header, rows = multi.claim_rows(cl)
    assert "p (Holm)" in header and len(rows) == len(cl)


def test_speed_claims_across_devices_are_refused():
    g = _group([10.0, 12.0, 11.0], metric="images_per_s", devices=("cpu", "cuda:0"))
    c = multi.paired_claim(g, "qbnn", "bnn", "images_per_s", better=None)
    assert c.verdict.startswith("not comparable (cpu vs cuda:0") and c.p is None
    same = multi.paired_claim(
        _group([10.0, 12.0, 11.0], metric="images_per_s"), "qbnn", "bnn", "images_per_s"
    )
    assert same.verdict == "supported"


def test_single_seed_claims_are_insufficient(hand_made):
    _, other = hand_made
    runs = multi.load_runs([other])
    g = multi.group_runs(runs)[0]
    assert multi.claims(g) == []  # only a dnn variant
    c = multi.paired_claim(multi.group_runs(multi.load_runs([hand_made[0] / "0"]))[0], "bnn", "dnn", "uce")
    assert c.verdict == "insufficient seeds (n=1)" and c.lo is None


def test_cli_writes_html_and_markdown(hand_made, tmp_path):
    sweep, other = hand_made
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qbdl.report",
            str(sweep),
            str(other),
            "--out",
            str(out),
            "--wandb",
            "me/qbdl",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()
    assert "Mean ± std over seeds" in md and "92 ± 2" in md
    assert "| bnn > dnn | OOD AUROC | 3 | 0.2 ± 0.1 |" in md and "not supported" in md
    assert "contradicted" in md and "| qbnn ≡ bnn | accuracy % | 3 |" in md and "| different |" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and "not supported" in html and "bayes.moped_delta=0.2" in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"][0]["seeds"] == [0, 1, 2]
    wr = json.loads((out / "wandb_report.json").read_text())  # offline: the structure, not saved
    assert wr["entity"] == "me" and any(b["type"] == "panel_grid" for b in wr["blocks"])


def test_cli_missing_dir_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qbdl.report", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "results.json" in proc.stderr


def test_wandb_report_object_builds_offline(hand_made):
    pytest.importorskip("wandb_workspaces")
    from qbdl.report import wandb_report

    runs = multi.load_runs([hand_made[0]])
    rep = wandb_report.build_report(runs, "me", "qbdl")
    assert type(rep).__name__ == "Report" and rep.entity == "me" and len(rep.blocks) >= 4
