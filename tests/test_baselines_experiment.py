"""The baselines inside the experiment: +experiment=digits_baselines end to end, the seed report's claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_run import compose_config
from scipy import stats

from qbdl.pipeline.run import run
from qbdl.report import multi
from qbdl.report.multi.claims import BASELINE_CLAIMS, baseline_claims

FAST = ["ensemble.members=2", "estimate=false", "data.n_photos=64"]
BASELINE_VARIANTS = ["qbnn", "ens", "ens_ts", "qens", "mcd", "qmcd", "lla", "lla_ts", "qlla"]


def test_digits_baselines_composes_every_variant(tmp_path):
    cfg = compose_config(tmp_path, ["+experiment=digits_baselines"], tiny=False)
    assert cfg.eval._target_ == "qbdl.baselines.stage.BaselinesEvaluation"
    base = {v.removesuffix("_ts") for v in cfg.eval.variants}
    assert base == {"dnn", "qdnn", "bnn", "bnn_mean", "qbnn", "ens", "qens", "mcd", "qmcd", "lla", "qlla"}
    assert all(f"{b}_ts" in cfg.eval.variants for b in base - {"bnn_mean"})
    assert cfg.ensemble.members == 4 and list(cfg.mcd.placement) == ["blocks", "head"]
    assert (
        cfg.lla.hessian == "full" and cfg.lla.link == "mc" and cfg.data._target_.endswith("DigitsDataModule")
    )
    for name in ("mnist_baselines", "fashion_mnist_baselines", "colorectal_baselines", "imagenet_baselines"):
        other = compose_config(tmp_path, [f"+experiment={name}"], tiny=False)
        assert other.eval._target_ == cfg.eval._target_ and "qlla" in other.eval.variants, name
    assert (
        other.lla.hessian == "kron" and "qmcd" not in other.eval.variants
    )  # imagenet: pretrained, no dropout net


def test_digits_baselines_runs(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = compose_config(
        out, ["+experiment=digits_baselines", *FAST, f"eval.variants=[{','.join(BASELINE_VARIANTS)}]"]
    )
    res = run(cfg)
    table = capsys.readouterr().out
    assert "img/s" in table and "mem MiB" in table and "passes" in table
    v = res["variants"]
    assert set(v) == set(BASELINE_VARIANTS)
    passes = {"qbnn": 2, "ens": 2, "qens": 2, "mcd": 2, "qmcd": 2, "lla": 1, "qlla": 1}  # eval.mc_samples = 2
    for name, r in v.items():
        assert 0 <= r["accuracy"] <= 1 and r["nll"] > 0 and set(r["ood"]) == {"photos", "rotated"}, name
        assert r["images_per_s"] > 0 and r["resident_bytes"] > 0, name
        assert r["backbone_passes"] == passes[name.removesuffix("_ts")], name
    assert v["lla"]["samples"] == 2 and v["ens"]["samples"] == 2  # lla: 2 head samples on one backbone pass
    assert v["qens"]["size_bytes"] < v["ens"]["size_bytes"] / 2  # int8 members
    assert res["baselines"]["lla"]["prior_precision"] in cfg.lla.prior_precisions
    assert Path(res["plots"]["uncertainty_vs_speed"]).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert "uncertainty_vs_speed" in saved["plots"] and saved["variants"]["qmcd"]["resident_bytes"] > 0
    for f in ("baselines/ens_member1.safetensors", "baselines/mcd.safetensors", "models/qens_member1.qbdl",
              "models/qmcd.qbdl", "models/qlla_backbone.qbdl"):  # fmt: skip
        assert (out / f).exists(), f
    # the FP32 dropout net and its INT8 twin disagree between passes: MC dropout is on at test time
    assert v["mcd"]["mi_mean"] > 0 and v["qmcd"]["mi_mean"] > 0


def _group(values: dict[str, list[float]], metric: str) -> multi.Group:
    runs = []
    for i in range(len(next(iter(values.values())))):
        variants = {name: {metric: xs[i], "device": "cpu"} for name, xs in values.items()}
        runs.append(multi.Run(Path(f"r{i}"), {"variants": variants, "config": {"eval": {}}}))
    return multi.Group(runs)


def test_seed_report_claims_qbnn_against_each_int8_baseline():
    assert [b for _, b, _ in BASELINE_CLAIMS] == ["qens", "qmcd", "qlla"]
    qbnn = [0.90, 0.92, 0.91, 0.93, 0.90]
    qens = [0.95, 0.96, 0.94, 0.97, 0.96]  # the ensemble detects OOD better on every seed
    cl = baseline_claims(_group({"qbnn": qbnn, "qens": qens}, "ood_auroc"))
    sup = next(c for c in cl if c.b == "qens" and c.metric == "ood_auroc" and c.kind == "superiority")
    d = [a - b for a, b in zip(qbnn, qens)]
    assert sup.p == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-9)
    assert sup.verdict == "contradicted (opposite sign)"  # where the QBNN loses, the report says so
    eq = next(c for c in cl if c.metric == "ood_auroc" and c.kind == "equivalence")
    assert eq.margin == 0.02 and eq.verdict == "different"
    speed = baseline_claims(_group({"qbnn": [90, 91, 92, 90, 93.0], "qlla": [300, 310, 290, 305, 300.0]},
                                   "images_per_s"))  # fmt: skip
    assert [c.verdict for c in speed if c.metric == "images_per_s"] == ["contradicted (opposite sign)"]
    assert multi.claims(_group({"qbnn": qbnn, "qmcd": qens}, "ood_auroc"))  # part of the report's claims


def test_seed_report_draws_each_metric_against_speed(tmp_path):
    runs = []
    for i in range(3):
        variants = {n: {"accuracy": 0.9 + 0.01 * i, "ood_auroc": a, "images_per_s": ips, "device": "cpu"}
                    for n, a, ips in (("qbnn", 0.8, 100.0), ("qens", 0.9, 60.0), ("qlla", 0.85, 300.0))}  # fmt: skip
        runs.append(multi.Run(tmp_path / f"r{i}", {"variants": variants, "config": {"seed": i, "eval": {}}}))
    files = multi.render.speed_plots(runs, tmp_path)
    assert list(files) == ["uncertainty_vs_speed_0"] and files["uncertainty_vs_speed_0"].stat().st_size > 0
    assert (
        multi.render.speed_plots(
            [multi.Run(tmp_path / "x", {"variants": {"a": {"accuracy": 1.0}}})], tmp_path
        )
        == {}
    )


# INT8 twins: |metric(qX) - metric(X)| on the full digits run, within the run's declared margins
# (eval.equivalence: accuracy 0.5 pt, NLL 0.01, ECE 1 pt, UCE 1 pt, OOD AUROC 0.02).
FIDELITY_METRICS = ("accuracy", "nll", "ece", "uce", "ood_auroc")


@pytest.mark.slow  # three extra DNN fits and the full 21-variant evaluation: ~3 min on an idle 2-core AVX2 CPU
def test_digits_baselines_int8_twins_within_the_fidelity_margins(tmp_path):
    cfg = compose_config(
        tmp_path / "run", ["+experiment=digits_baselines", "logger=csv", "estimate=false"], tiny=False
    )
    res = run(cfg)["variants"]
    margins = dict(cfg.eval.equivalence)
    gaps = {
        (fp, m): abs(res[f"q{fp}"][m] - res[fp][m])
        for fp in ("ens", "mcd", "lla", "bnn")
        for m in FIDELITY_METRICS
    }
    over = {k: round(g, 4) for k, g in gaps.items() if g > margins[k[1]]}
    assert not over, f"INT8 twins beyond eval.equivalence {margins}: {over}"
