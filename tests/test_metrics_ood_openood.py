"""OpenOOD-v1.5-style OOD metrics (AUROC, AUPR-in/out, FPR@95) per score, and their use in summarize."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import qbdl.metrics as M

sk_metrics = pytest.importorskip("sklearn.metrics")


def _discrete(seed: int, s: int = 2, c: int = 4, n_in: int = 70, n_out: int = 50):
    """ID / OOD logits drawn from a few fixed atoms (heavy ties in every score), and their softmax."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(s, 5, c, generator=g, dtype=torch.float64) * 2
    atoms[:, 3:] *= 0.2  # flatter atoms, drawn more often out of distribution
    li = atoms[:, torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.05, 0.05]), n_in, True, generator=g)]
    lo = atoms[:, torch.multinomial(torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3]), n_out, True, generator=g)]
    return torch.softmax(li, -1), torch.softmax(lo, -1), li, lo


def _openood_reference(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    """OpenOOD v1.5 ``compute_all_metrics`` conventions on sklearn (OOD positive; conf = -score).

    AUPR here is sklearn's average precision (our documented choice) instead of OpenOOD's
    trapezoidal ``auc(recall, precision)``.
    """
    conf = -np.concatenate([s_in, s_out])
    ood = np.concatenate([np.zeros_like(s_in), np.ones_like(s_out)])
    fpr, tpr, _ = sk_metrics.roc_curve(ood, -conf)
    return {
        "auroc": sk_metrics.roc_auc_score(ood, -conf),
        "aupr_in": sk_metrics.average_precision_score(1 - ood, conf),
        "aupr_out": sk_metrics.average_precision_score(ood, -conf),
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
    }


def _np_scores(p: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
    pbar = p.mean(0).numpy()
    h = -(pbar * np.log(np.where(pbar > 0, pbar, 1))).sum(-1)
    ale = -(p.numpy() * np.log(np.where(p.numpy() > 0, p.numpy(), 1))).sum(-1).mean(0)
    mean_logit = logits.mean(0).numpy()
    mx = mean_logit.max(-1)
    return {
        "entropy": h,
        "mi": np.maximum(h - ale, 0),
        "maxprob": 1 - pbar.max(-1),
        "maxlogit": -mx,
        "energy": -(mx + np.log(np.exp(mean_logit - mx[:, None]).sum(-1))),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_metrics_match_sklearn_and_openood_with_ties(seed):
    p_in, p_out, l_in, l_out = _discrete(seed)
    res = M.ood_metrics(p_in, p_out, l_in, l_out)
    assert list(res) == ["entropy", "mi", "maxprob", "maxlogit", "energy"]
    ref_in, ref_out = _np_scores(p_in, l_in), _np_scores(p_out, l_out)
    for score, block in res.items():
        assert list(block) == list(M.OOD_METRIC_KEYS)
        s_in, s_out = ref_in[score], ref_out[score]
        assert len(np.unique(np.round(np.concatenate([s_in, s_out]), 9))) <= 5  # heavy ties
        ref = _openood_reference(s_in, s_out)
        for key in M.OOD_METRIC_KEYS:
            assert block[key] == pytest.approx(ref[key], abs=1e-9), (score, key)


@pytest.mark.parametrize("seed", [0, 1])
def test_fpr95_matches_torch_uncertainty(seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tu = pytest.importorskip("torch_uncertainty.metrics.classification")
    rng = np.random.default_rng(seed)
    for rounding in (None, 1, 0):
        s_in = rng.normal(size=200)
        s_out = rng.normal(size=150) + 1.5
        if rounding is not None:  # ties, including across the ID / OOD boundary
            s_in, s_out = np.round(s_in, rounding), np.round(s_out, rounding)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "will save all targets and predictions in buffer"
            ref = tu.FPR95(pos_label=1)
        scores = torch.from_numpy(np.concatenate([s_in, s_out]))
        labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(150, dtype=torch.long)])
        ref.update(scores, labels)
        ours = M.ood_detection_metrics(torch.from_numpy(s_in), torch.from_numpy(s_out))["fpr95"]
        assert ours == pytest.approx(float(ref.compute()), abs=1e-7)  # torch-uncertainty returns float32
        assert M.binary_fpr_at_tpr(scores, labels, 0.95) == ours


def test_logit_scores_hand_case_and_mc_reduction():
    # S = 2: the MC-mean logit is averaged first, then max / logsumexp over classes
    logits = torch.tensor([[[2.0, 0.0, -1.0]], [[0.0, 2.0, -1.0]]])
    mean = torch.tensor([1.0, 1.0, -1.0])
    torch.testing.assert_close(M.logit_scores(logits, "maxlogit"), torch.tensor([-1.0]))
    torch.testing.assert_close(M.logit_scores(logits, "energy"), -torch.logsumexp(mean, 0).reshape(1))
    assert M.logit_scores(logits).dtype == torch.float32
    assert M.logit_scores(logits.double()).dtype == torch.float64
    # larger = more OOD: a flat, small-logit row scores higher than a peaked, large-logit one
    two = torch.tensor([[[8.0, 0.0, 0.0], [0.1, 0.0, 0.0]]])
    for score in ("maxlogit", "energy"):
        s = M.logit_scores(two, score)
        assert s[1] > s[0]
    with pytest.raises(ValueError, match="unknown logit score"):
        M.logit_scores(logits, "entropy")
    with pytest.raises(ValueError, match=r"\[S, B, C\]"):
        M.logit_scores(logits[0])


def test_ood_metrics_hand_case_and_validation():
    p_in = torch.tensor([[[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]])
    p_out = torch.tensor([[[1 / 3, 1 / 3, 1 / 3]]])
    res = M.ood_metrics(p_in, p_out)
    assert list(res) == ["entropy", "mi", "maxprob"]  # no logits -> no logit scores
    assert res["entropy"] == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    # S = 1 -> MI = 0 everywhere: all tied; AUPR = prevalence, FPR95 = 1 (all ID flagged)
    assert res["mi"] == pytest.approx({"auroc": 0.5, "aupr_in": 2 / 3, "aupr_out": 1 / 3, "fpr95": 1.0})
    with pytest.raises(ValueError, match="needs logits_in"):
        M.ood_metrics(p_in, p_out, scores=("energy",))
    with pytest.raises(ValueError, match="unknown OOD score"):
        M.ood_metrics(p_in, p_out, scores=("bogus",))
    with pytest.raises(ValueError, match="logits_in has"):
        M.ood_metrics(p_in, p_out, torch.zeros(1, 3, 3), torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="NaN"):
        M.ood_metrics(p_in, p_out, torch.full((1, 2, 3), float("nan")), torch.zeros(1, 1, 3))


# ------------------------------------------------------------------------------------------------
# summarize
# ------------------------------------------------------------------------------------------------
def _summary_inputs():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 120, 5, generator=g) * 2
    p = torch.softmax(logits, -1)
    y = torch.multinomial(p.mean(0), 1, generator=g).squeeze(1)
    ood_logits = {
        "noise": torch.randn(3, 50, 5, generator=g) * 0.5,
        "shifted": torch.randn(3, 40, 5, generator=g) * 1.2,
        "rotated": torch.randn(3, 30, 5, generator=g) * 1.5,
    }
    ood = {k: torch.softmax(v, -1) for k, v in ood_logits.items()}
    return p, y, logits, ood, ood_logits


@pytest.mark.parametrize("score", ["entropy", "mi", "maxprob"])
def test_summarize_flat_ood_keys_follow_score(score):
    p, y, logits, ood, ood_logits = _summary_inputs()
    out = M.summarize(p, y, ood=ood, score=score, logits=logits, ood_logits={"noise": ood_logits["noise"]})
    assert list(out) == list(M.SUMMARY_KEYS)
    json.dumps(out)
    for name, p_out in ood.items():
        blk = out["ood"][name]
        assert list(blk) == list(M.OOD_KEYS)
        assert blk["score"] == score and blk["group"] is None
        assert blk["auroc"] == pytest.approx(M.ood_auroc(p, p_out, score=score), abs=1e-12)
        assert blk["aupr"] == pytest.approx(M.ood_aupr(p, p_out, score=score), abs=1e-12)
        assert blk["fpr95"] == pytest.approx(M.ood_fpr_at_tpr(p, p_out, score=score), abs=1e-12)
        assert blk["auroc_mi"] == pytest.approx(M.ood_auroc(p, p_out, score="mi"), abs=1e-12)
        assert blk["aupr_mi"] == pytest.approx(M.ood_aupr(p, p_out, score="mi"), abs=1e-12)
        assert blk["fpr95_mi"] == pytest.approx(M.ood_fpr_at_tpr(p, p_out, score="mi"), abs=1e-12)
        assert (
            blk["auroc"] == blk["scores"][score]["auroc"] and blk["aupr"] == blk["scores"][score]["aupr_out"]
        )
        # logit scores only where logits exist for both ID and this OOD set
        logit_names = ["maxlogit", "energy"] if name == "noise" else []
        assert list(blk["scores"]) == ["entropy", "mi", "maxprob", *logit_names]
        expected = M.ood_metrics(p, p_out, logits, ood_logits[name] if name == "noise" else None)
        for k, v in expected.items():
            assert blk["scores"][k] == pytest.approx(v, abs=1e-12)
    assert out["ood_auroc"] == out["ood"]["noise"]["auroc"]
    # the flat keys differ between scores (so the old entropy-only behaviour would be caught)
    if score != "entropy":
        ent = M.summarize(p, y, ood=ood)
        assert any(ent["ood"][k]["auroc"] != out["ood"][k]["auroc"] for k in ood)


def test_summarize_ood_group_means():
    p, y, logits, ood, ood_logits = _summary_inputs()
    groups = {"noise": "far", "shifted": "near", "rotated": "near", "unused": "far"}
    out = M.summarize(p, y, ood=ood, logits=logits, ood_logits=ood_logits, ood_groups=groups, score="maxprob")
    json.dumps(out)
    assert [out["ood"][k]["group"] for k in ood] == ["far", "near", "near"]
    assert set(out["ood_groups"]) == {"far", "near"}
    for group, members in (("far", ["noise"]), ("near", ["shifted", "rotated"])):
        assert list(out["ood_groups"][group]) == list(M.OOD_SCORES)
        for score, block in out["ood_groups"][group].items():
            for key in M.OOD_METRIC_KEYS:
                vals = [out["ood"][m]["scores"][score][key] for m in members]
                assert block[key] == pytest.approx(sum(vals) / len(vals), abs=1e-15)
    # only groups that are present; none without OOD data
    only_near = M.summarize(p, y, ood={"shifted": ood["shifted"]}, ood_groups=groups)
    assert list(only_near["ood_groups"]) == ["near"]
    assert list(only_near["ood_groups"]["near"]) == ["entropy", "mi", "maxprob"]
    assert M.summarize(p, y)["ood_groups"] == {}
    # a logit score present in only some of a group's sets is averaged over the sets that have it
    partial = M.summarize(
        p, y, ood=ood, logits=logits, ood_logits={"shifted": ood_logits["shifted"]}, ood_groups=groups
    )
    assert partial["ood_groups"]["near"]["energy"] == partial["ood"]["shifted"]["scores"]["energy"]


def test_summarize_new_selective_keys():
    p, y, _, _, _ = _summary_inputs()
    out = M.summarize(p, y, score="mi", coverages=(0.5, 0.9), risks=(0.1, 0.3))
    assert out["ece_adaptive"] == pytest.approx(M.adaptive_calibration_error(p, y))
    assert out["augrc"] == pytest.approx(M.augrc(p, y, score="mi"))
    assert out["risk_at_coverage"] == {
        "0.5": pytest.approx(M.risk_at_coverage(p, y, 0.5, "mi")),
        "0.9": pytest.approx(M.risk_at_coverage(p, y, 0.9, "mi")),
    }
    assert out["coverage_at_risk"] == {
        "0.1": pytest.approx(M.coverage_at_risk(p, y, 0.1, "mi")),
        "0.3": pytest.approx(M.coverage_at_risk(p, y, 0.3, "mi")),
    }
    default = M.summarize(p, y)
    assert list(default["risk_at_coverage"]) == ["0.8", "0.9", "0.95"]
    assert list(default["coverage_at_risk"]) == ["0.01", "0.02", "0.05"]
    assert all(0 <= v <= 1 and math.isfinite(v) for v in default["coverage_at_risk"].values())
    with pytest.raises(ValueError, match="unknown uncertainty score"):
        M.summarize(p, y, score="energy")
    with pytest.raises(ValueError, match="coverage"):
        M.summarize(p, y, coverages=(0.0,))
