"""Pure-function metrics: hand-computed cases, agreement with independent references, validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import qbdl.metrics as M

scipy_stats = pytest.importorskip("scipy.stats")
sk_metrics = pytest.importorskip("sklearn.metrics")


def _h2(q: float) -> float:
    """Binary entropy in nats."""
    return -sum(v * math.log(v) for v in (q, 1 - q) if v > 0)


# Hand case, S = 1, C = 2.  Confidences 0.9, 0.7, 0.55, 0.5 fall in distinct 1/15 bins (13, 10, 8, 7),
# away from bin edges.  argmax pbar = [0, 1, 0, 0] (row 3 is a 0.5/0.5 tie -> first class, 0).
P_HAND = torch.tensor([[[0.9, 0.1], [0.3, 0.7], [0.55, 0.45], [0.5, 0.5]]])
Y_HAND = torch.tensor([0, 0, 1, 0])
# correct = [1, 0, 0, 1]


def test_hand_accuracy_nll_brier():
    assert M.accuracy(P_HAND, Y_HAND) == pytest.approx(0.5)
    # -log pbar[y] = -log .9, -log .3, -log .45, -log .5
    expected_nll = -(math.log(0.9) + math.log(0.3) + math.log(0.45) + math.log(0.5)) / 4
    assert M.nll(P_HAND, Y_HAND) == pytest.approx(expected_nll)
    # sum_c (pbar_c - onehot_c)^2 = 2*.1^2, 2*.7^2, 2*.55^2, 2*.5^2 = .02, .98, .605, .5 -> mean .52625
    assert M.brier(P_HAND, Y_HAND) == pytest.approx(0.52625)


def test_hand_ece_mce():
    # One point per bin: ECE = mean_i |correct_i - conf_i| = (.1 + .7 + .55 + .5) / 4; MCE = .7
    assert M.expected_calibration_error(P_HAND, Y_HAND) == pytest.approx(1.85 / 4)
    assert M.maximum_calibration_error(P_HAND, Y_HAND) == pytest.approx(0.7)
    bins = M.reliability_bins(P_HAND, Y_HAND)
    assert bins.count.tolist() == [0] * 7 + [1, 1, 0, 1, 0, 0, 1, 0]
    assert bins.accuracy[13] == 1.0 and bins.confidence[13] == pytest.approx(0.9)
    assert bins.accuracy[10] == 0.0 and bins.confidence[10] == pytest.approx(0.7)


def test_hand_uce_muce():
    # u = H/log 2: u(.9) = .469 -> bin 7; u(.7) = .881 -> bin 13; u(.55) = .9928 and u(.5) = 1 -> bin 14.
    u = [_h2(q) / math.log(2) for q in (0.9, 0.7, 0.55, 0.5)]
    err = [0, 1, 1, 0]
    gap7 = abs(err[0] - u[0])
    gap13 = abs(err[1] - u[1])
    gap14 = abs((err[2] + err[3]) / 2 - (u[2] + u[3]) / 2)
    expected = (gap7 + gap13 + 2 * gap14) / 4
    assert M.uncertainty_calibration_error(P_HAND, Y_HAND) == pytest.approx(expected)
    assert M.maximum_uncertainty_calibration_error(P_HAND, Y_HAND) == pytest.approx(max(gap7, gap13, gap14))
    bins = M.uncertainty_calibration_bins(P_HAND, Y_HAND)
    assert bins.count[7] == 1 and bins.count[13] == 1 and bins.count[14] == 2 and bins.count.sum() == 4
    assert bins.error[14] == pytest.approx(0.5)


def test_hand_referral():
    # entropy order (most uncertain first): rows 3 (.693), 2 (.688), 1 (.611), 0 (.325)
    # correct in that order: [1, 0, 0, 1]; retained accuracy after referring k:
    # k=0: 2/4, k=1: rows {2,1,0} -> 1/3, k=2: rows {1,0} -> 1/2, k=3: row {0} -> 1
    c = M.referral_curve(P_HAND, Y_HAND)
    torch.testing.assert_close(c.fraction_referred, torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(c.accuracy, torch.tensor([0.5, 1 / 3, 0.5, 1.0], dtype=torch.float64))
    # oracle: 2 correct of n - k retained, capped at 1
    torch.testing.assert_close(c.oracle_accuracy, torch.tensor([0.5, 2 / 3, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(c.random_accuracy, torch.full((4,), 0.5, dtype=torch.float64))
    assert M.referral_rate_at_accuracy(P_HAND, Y_HAND, 0.5) == 0.0
    assert M.referral_rate_at_accuracy(P_HAND, Y_HAND, 0.6) == 0.75
    assert M.referral_rate_at_accuracy(P_HAND, Y_HAND, 1.0) == 0.75
    assert M.referral_auc(P_HAND, Y_HAND) == pytest.approx((0.5 + 1 / 3 + 0.5 + 1.0) / 4)
    assert M.aurc(P_HAND, Y_HAND) == pytest.approx((0.5 + 2 / 3 + 0.5 + 0.0) / 4)
    # oracle risks: .5, 1/3, 0, 0 -> E-AURC = AURC - (.5 + 1/3) / 4
    assert M.eaurc(P_HAND, Y_HAND) == pytest.approx((0.5 + 2 / 3 + 0.5) / 4 - (0.5 + 1 / 3) / 4)


def test_referral_ties_are_random_in_expectation():
    # All rows identical -> equal scores; prediction is class 0 everywhere.  Every ordering of the tied
    # points is equally likely, so each referred point removes the mean correctness 2/3.
    p = torch.tensor([[[0.6, 0.4]] * 3])
    for y in ([1, 0, 0], [0, 0, 1], [0, 1, 0]):
        acc = M.referral_curve(p, torch.tensor(y)).accuracy
        torch.testing.assert_close(acc, torch.full((3,), 2 / 3, dtype=torch.float64))
        assert M.aurc(p, torch.tensor(y)) == pytest.approx(1 / 3)
        assert M.referral_rate_at_accuracy(p, torch.tensor(y), 0.7) == 1.0


def test_referral_scores_mi_and_maxprob():
    # S = 2: row 0 has samples that disagree (MI = log 2, H = log 2); row 1 agrees at .5/.5 (MI = 0, H = log 2);
    # row 2 is confident (.9/.1 twice).  Targets make rows 0 and 2 correct (pbar argmax 0), row 1 wrong.
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]], [[0.0, 1.0], [0.5, 0.5], [0.9, 0.1]]])
    y = torch.tensor([0, 1, 0])
    torch.testing.assert_close(M.uncertainty_scores(p, "mi"), torch.tensor([math.log(2), 0.0, 0.0]))
    torch.testing.assert_close(M.uncertainty_scores(p, "maxprob"), torch.tensor([0.5, 0.5, 0.1]))
    # mi order: row 0, then rows 1, 2 tie (mean correctness 1/2 each). correct = [1, 0, 1]
    # k=0: 2/3; k=1: rows {1,2} -> 1/2; k=2: one of rows 1, 2 at random -> 1/2 in expectation
    acc_mi = M.referral_curve(p, y, score="mi").accuracy
    torch.testing.assert_close(acc_mi, torch.tensor([2 / 3, 0.5, 0.5], dtype=torch.float64))
    # entropy: rows 0 and 1 tie at log 2 (mean correctness 1/2), then row 2:
    # k=0: 2/3; k=1: expected (1 + 0.5) / 2 = 0.75; k=2: row {2} -> 1
    acc_h = M.referral_curve(p, y, score="entropy").accuracy
    torch.testing.assert_close(acc_h, torch.tensor([2 / 3, 0.75, 1.0], dtype=torch.float64))


def test_all_correct_and_all_wrong():
    one_hot = torch.eye(3)[[0, 1, 2, 1]].unsqueeze(0)  # confident, conf = 1, u = 0
    y_ok = torch.tensor([0, 1, 2, 1])
    y_bad = torch.tensor([1, 2, 0, 0])
    # all correct: perfect everything; u = 0 must land in the first uncertainty bin
    assert M.accuracy(one_hot, y_ok) == 1.0
    assert M.nll(one_hot, y_ok) == pytest.approx(0.0, abs=1e-9)
    assert M.brier(one_hot, y_ok) == 0.0
    assert M.expected_calibration_error(one_hot, y_ok) == 0.0
    assert M.uncertainty_calibration_error(one_hot, y_ok) == 0.0
    assert M.uncertainty_calibration_bins(one_hot, y_ok).count[0] == 4
    assert M.referral_rate_at_accuracy(one_hot, y_ok, 0.995) == 0.0
    assert M.aurc(one_hot, y_ok) == 0.0 and M.eaurc(one_hot, y_ok) == 0.0
    # all wrong: NLL = -log EPS, Brier = 2, ECE = |0 - 1| = 1, UCE = |1 - 0| = 1, target never reached
    assert M.accuracy(one_hot, y_bad) == 0.0
    assert M.nll(one_hot, y_bad) == pytest.approx(-math.log(M.EPS))
    assert M.brier(one_hot, y_bad) == pytest.approx(2.0)
    assert M.expected_calibration_error(one_hot, y_bad) == pytest.approx(1.0)
    assert M.maximum_calibration_error(one_hot, y_bad) == pytest.approx(1.0)
    assert M.uncertainty_calibration_error(one_hot, y_bad) == pytest.approx(1.0)
    assert M.maximum_uncertainty_calibration_error(one_hot, y_bad) == pytest.approx(1.0)
    assert M.referral_rate_at_accuracy(one_hot, y_bad, 0.5) == 1.0
    assert M.aurc(one_hot, y_bad) == 1.0 and M.eaurc(one_hot, y_bad) == 0.0


def test_accuracy_uses_predictive_mean_not_samples():
    # Each sample votes 0 or 2, but the mean [.3, .4, .3] predicts class 1.
    p = torch.tensor([[[0.6, 0.4, 0.0]], [[0.0, 0.4, 0.6]]])
    assert M.accuracy(p, torch.tensor([1])) == 1.0
    assert M.accuracy(p, torch.tensor([0])) == 0.0


def test_entropy_decomposition_hand_cases():
    # disagreeing one-hot samples: H[pbar] = log 2, aleatoric 0, MI = log 2
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.5, 0.5]]])
    ln2 = math.log(2)
    # float32 in -> float32 out (as torchmetrics' functional API)
    torch.testing.assert_close(M.predictive_entropy(p), torch.tensor([ln2, ln2]))
    torch.testing.assert_close(M.aleatoric_entropy(p), torch.tensor([0.0, ln2]))
    torch.testing.assert_close(M.mutual_information(p), torch.tensor([ln2, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_per_point_quantities_keep_input_dtype(dtype):
    g = torch.Generator().manual_seed(11)
    p64 = torch.softmax(torch.randn(3, 20, 4, generator=g, dtype=torch.float64) * 2, -1)
    p = p64.to(dtype)
    for fn in (
        M.predictive_entropy,
        M.aleatoric_entropy,
        M.mutual_information,
        *(lambda q, s=s: M.uncertainty_scores(q, s) for s in ("entropy", "mi", "maxprob")),
    ):
        out = fn(p)
        assert out.dtype == dtype and out.shape == (20,)
        # internal maths in float64: the result is the float64 value of the (rounded) input, cast once
        assert torch.equal(out, fn(p.double()).to(dtype))


def test_entropy_and_mi_match_scipy():
    g = torch.Generator().manual_seed(0)
    # float64 so scipy's internal renormalisation does not differ from ours by float32 round-off
    p = torch.softmax(torch.randn(5, 40, 7, generator=g, dtype=torch.float64) * 2, -1)
    pbar = p.double().mean(0).numpy()
    h = scipy_stats.entropy(pbar, axis=-1)
    ale = scipy_stats.entropy(p.double().numpy(), axis=-1).mean(0)
    np.testing.assert_allclose(M.predictive_entropy(p).numpy(), h, rtol=1e-6)
    np.testing.assert_allclose(M.aleatoric_entropy(p).numpy(), ale, rtol=1e-6)
    np.testing.assert_allclose(M.mutual_information(p).numpy(), np.maximum(h - ale, 0), atol=1e-9)
    assert bool((M.mutual_information(p) > 0).all())
    # S = 1: no epistemic part (clamped at exactly 0)
    assert bool((M.mutual_information(p[:1]) == 0).all())


@pytest.mark.parametrize(
    ("seed", "s", "c", "temp"), [(0, 1, 10, 1.0), (1, 1, 3, 3.0), (2, 4, 5, 0.5), (3, 1, 2, 5.0)]
)
def test_ece_matches_torchmetrics(seed, s, c, temp):
    from torchmetrics.classification import MulticlassCalibrationError

    g = torch.Generator().manual_seed(seed)
    n = 500
    p = torch.softmax(torch.randn(s, n, c, generator=g) * temp, -1)
    y = torch.randint(0, c, (n,), generator=g)
    pbar = p.mean(0)
    for norm, ours in (("l1", M.expected_calibration_error), ("max", M.maximum_calibration_error)):
        ref = MulticlassCalibrationError(num_classes=c, n_bins=15, norm=norm)(pbar, y)
        assert ours(p, y) == pytest.approx(float(ref), abs=1e-6)
        # n_bins other than 15 too
        ref10 = MulticlassCalibrationError(num_classes=c, n_bins=10, norm=norm)(pbar, y)
        assert ours(p, y, n_bins=10) == pytest.approx(float(ref10), abs=1e-6)


def test_ece_matches_torchmetrics_with_saturated_and_edge_confidences():
    from torchmetrics.classification import MulticlassCalibrationError

    # Confidence exactly 1.0 (own bucket in torchmetrics) and exactly on bin edges (k/15 in float32).
    edges = torch.linspace(0, 1, 16)[8:15]
    rows = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])]
    rows += [torch.stack([e, (1 - e) / 2, (1 - e) / 2]) for e in edges]
    rows += [torch.tensor([0.96, 0.04, 0.0]), torch.tensor([0.99, 0.01, 0.0])]
    pbar = torch.stack(rows)
    pbar = pbar / pbar.sum(-1, keepdim=True)
    y = torch.tensor([0, 0, 0, 1, 0, 2, 0, 0, 1, 1, 0])
    ref = MulticlassCalibrationError(num_classes=3, n_bins=15, norm="l1")(pbar, y)
    assert M.expected_calibration_error(pbar[None], y) == pytest.approx(float(ref), abs=1e-7)
    # ECE is a fraction in [0, 1] and differs from the "max" statistic here
    assert 0 < M.expected_calibration_error(pbar[None], y) < M.maximum_calibration_error(pbar[None], y) <= 1


def _discrete_ood(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In/out predictions drawn from a few fixed distributions, so many entropies tie."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.tensor([[0.98, 0.01, 0.01], [0.8, 0.1, 0.1], [0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]])
    p_in = atoms[torch.multinomial(torch.tensor([0.5, 0.3, 0.15, 0.05]), 60, True, generator=g)]
    p_out = atoms[torch.multinomial(torch.tensor([0.1, 0.2, 0.3, 0.4]), 45, True, generator=g)]
    return p_in[None], p_out[None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_metrics_match_sklearn_with_ties(seed):
    p_in, p_out = _discrete_ood(seed)
    s_in = M.predictive_entropy(p_in).numpy()
    s_out = M.predictive_entropy(p_out).numpy()
    scores = np.concatenate([s_in, s_out])
    labels = np.concatenate([np.zeros_like(s_in), np.ones_like(s_out)])
    assert len(np.unique(scores)) <= 4  # ties are really present
    assert M.ood_auroc(p_in, p_out) == pytest.approx(sk_metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert M.ood_aupr(p_in, p_out) == pytest.approx(
        sk_metrics.average_precision_score(labels, scores), abs=1e-12
    )
    fpr_ref, tpr_ref, _ = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr = M.ood_roc_curve(p_in, p_out)
    np.testing.assert_allclose(fpr.numpy(), fpr_ref)
    np.testing.assert_allclose(tpr.numpy(), tpr_ref)
    for level in (0.95, 0.5):
        expected = fpr_ref[tpr_ref >= level].min()
        assert M.ood_fpr_at_tpr(p_in, p_out, tpr=level) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_ranking_metrics_match_sklearn_continuous_and_rounded(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels * 0.8
    for sc in (scores, np.round(scores, 1)):
        t_s, t_l = torch.from_numpy(sc), torch.from_numpy(labels)
        assert M.binary_auroc(t_s, t_l) == pytest.approx(sk_metrics.roc_auc_score(labels, sc), abs=1e-12)
        assert M.binary_average_precision(t_s, t_l) == pytest.approx(
            sk_metrics.average_precision_score(labels, sc), abs=1e-12
        )


def test_ood_hand_case_and_mi_score():
    # in: confident (H small); out: uniform (H = log 3) -> perfect separation
    p_in = torch.tensor([[[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]])
    p_out = torch.tensor([[[1 / 3, 1 / 3, 1 / 3]]])
    assert M.ood_auroc(p_in, p_out) == 1.0
    assert M.ood_aupr(p_in, p_out) == 1.0
    assert M.ood_fpr_at_tpr(p_in, p_out) == 0.0
    # reversed roles -> AUROC 0, and all scores tied -> 0.5
    assert M.ood_auroc(p_out, p_in) == 0.0
    assert M.ood_auroc(p_in, p_in) == 0.5
    # S = 1 has MI = 0 everywhere: the MI score cannot separate anything
    assert M.ood_auroc(p_in, p_out, score="mi") == 0.5


def test_aurc_matches_naive_loop():
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(3, 80, 4, generator=g) * 1.5, -1)
    y = torch.randint(0, 4, (80,), generator=g)
    for score in ("entropy", "mi", "maxprob"):
        s = M.uncertainty_scores(p, score).tolist()
        correct = (p.mean(0).argmax(-1) == y).tolist()
        # continuous scores (no ties): referral follows the descending score; retained sets are its suffixes
        desc = sorted(range(80), key=lambda i: -s[i])
        risks = [1 - sum(correct[i] for i in desc[k:]) / (80 - k) for k in range(80)]
        assert M.aurc(p, y, score=score) == pytest.approx(sum(risks) / 80)
        n_err = 80 - sum(correct)
        oracle = [max(0, n_err - k) / (80 - k) for k in range(80)]
        assert M.eaurc(p, y, score=score) == pytest.approx(sum(risks) / 80 - sum(oracle) / 80)
        assert M.aurc(p, y, score=score) == pytest.approx(1 - M.referral_auc(p, y, score=score))


def test_summarize_keys_and_consistency():
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(4, 120, 5, generator=g) * 2, -1)
    y = torch.randint(0, 5, (120,), generator=g)
    ood = {"noise": torch.softmax(torch.randn(4, 50, 5, generator=g) * 0.3, -1), "other": p[:, :30]}
    out = M.summarize(p, y, ood=ood, target_accuracy=0.9)
    assert set(out) == set(M.SUMMARY_KEYS)
    json.dumps(out)  # must be JSON-serialisable
    assert out["accuracy"] == pytest.approx(M.accuracy(p, y))
    assert out["nll"] == pytest.approx(M.nll(p, y))
    assert out["brier"] == pytest.approx(M.brier(p, y))
    assert out["ece"] == pytest.approx(M.expected_calibration_error(p, y))
    assert out["mce"] == pytest.approx(M.maximum_calibration_error(p, y))
    assert out["uce"] == pytest.approx(M.uncertainty_calibration_error(p, y))
    assert out["muce"] == pytest.approx(M.maximum_uncertainty_calibration_error(p, y))
    assert out["entropy_mean"] == pytest.approx(float(M.predictive_entropy(p).mean()))
    assert out["aleatoric_mean"] == pytest.approx(float(M.aleatoric_entropy(p).mean()))
    assert out["mi_mean"] == pytest.approx(float(M.mutual_information(p).mean()))
    assert out["referral_rate_at_target"] == pytest.approx(M.referral_rate_at_accuracy(p, y, 0.9))
    assert out["referral_auc"] == pytest.approx(M.referral_auc(p, y))
    assert out["aurc"] == pytest.approx(M.aurc(p, y))
    assert out["eaurc"] == pytest.approx(M.eaurc(p, y))
    assert list(out["ood"]) == ["noise", "other"]
    blk = out["ood"]["noise"]
    assert set(blk) == set(M.OOD_KEYS)
    assert blk["auroc"] == pytest.approx(M.ood_auroc(p, ood["noise"]))
    assert blk["aupr_mi"] == pytest.approx(M.ood_aupr(p, ood["noise"], score="mi"))
    assert blk["fpr95_mi"] == pytest.approx(M.ood_fpr_at_tpr(p, ood["noise"], score="mi"))
    assert out["ood_auroc"] == blk["auroc"]
    assert blk["auroc"] > 0.8  # flat-softmax noise is clearly more uncertain
    none = M.summarize(p, y)
    assert none["ood"] == {} and none["ood_auroc"] is None
    # the referral ranking follows `score`
    mp = M.summarize(p, y, score="maxprob")
    assert mp["aurc"] == pytest.approx(M.aurc(p, y, score="maxprob"))


def test_metrics_import_no_heavy_frameworks():
    import subprocess
    import sys

    code = (
        "import sys, qbdl.metrics; "
        "bad = [m for m in ('lightning', 'hydra', 'omegaconf', 'pytorch_lightning') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------
# invalid input
# ------------------------------------------------------------------------------------------------
GOOD_P = torch.full((2, 3, 4), 0.25)
GOOD_Y = torch.tensor([0, 1, 3])


@pytest.mark.parametrize(
    ("p", "y", "match"),
    [
        (torch.full((3, 4), 0.25), GOOD_Y, r"\[S, B, C\].*unsqueeze\(0\)"),
        (torch.full((1, 2, 3, 4), 0.25), GOOD_Y, r"shape \[S, B, C\]"),
        (torch.full((0, 3, 4), 0.25), GOOD_Y, "S = 0"),
        (torch.full((2, 0, 4), 0.25), torch.zeros(0, dtype=torch.long), "B = 0"),
        (torch.ones((2, 3, 1)), GOOD_Y, "C = 1"),
        (
            GOOD_P.index_put((torch.tensor(1), torch.tensor(2), torch.tensor(0)), torch.tensor(float("nan"))),
            GOOD_Y,
            "NaN or inf",
        ),
        (torch.tensor([[[float("inf"), 0, 0, 0]] * 3]), GOOD_Y, "NaN or inf"),
        (torch.tensor([[[1.5, -0.5, 0.0, 0.0]] * 3]), GOOD_Y, "negative probabilities"),
        (torch.arange(24.0).reshape(2, 3, 4), GOOD_Y, "sum to 1.*softmax"),
        (GOOD_P * 1.01, GOOD_Y, "sum to 1"),
        (torch.ones(2, 3, 4, dtype=torch.long), GOOD_Y, "floating-point"),
        (GOOD_P, torch.tensor([0, 1]), "shape mismatch"),
        (GOOD_P, torch.tensor([0, 1, 4]), "out of range"),
        (GOOD_P, torch.tensor([0, -1, 2]), "out of range"),
        (GOOD_P, torch.tensor([0.0, 1.0, 2.0]), "integer class indices"),
        (GOOD_P, torch.tensor([[0, 1, 2]]), r"shape \[B\]"),
    ],
)
def test_invalid_inputs_raise(p, y, match):
    for fn in (M.accuracy, M.nll, M.brier, M.expected_calibration_error, M.referral_curve, M.summarize):
        with pytest.raises(ValueError, match=match):
            fn(p, y)


def test_small_sum_error_is_tolerated():
    p = GOOD_P.clone()
    p[..., 0] += 5e-4
    assert M.accuracy(p, GOOD_Y) == pytest.approx(1 / 3)


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="unknown uncertainty score"):
        M.uncertainty_scores(GOOD_P, "variance")
    with pytest.raises(ValueError, match="n_bins"):
        M.expected_calibration_error(GOOD_P, GOOD_Y, n_bins=0)
    with pytest.raises(ValueError, match="target accuracy"):
        M.referral_rate_at_accuracy(GOOD_P, GOOD_Y, 1.5)
    with pytest.raises(ValueError, match="classes"):
        M.ood_auroc(GOOD_P, torch.full((1, 2, 3), 1 / 3))
    with pytest.raises(ValueError, match="at least one negative"):
        M.binary_auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="p_out.*NaN"):
        M.ood_auroc(GOOD_P, torch.full((1, 2, 4), float("nan")))
    with pytest.raises(ValueError, match="tpr"):
        M.ood_fpr_at_tpr(GOOD_P, GOOD_P, tpr=0.0)
