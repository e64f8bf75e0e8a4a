"""Selective classification: random tie-breaking, AUGRC, risk@coverage, coverage@risk, adaptive ECE."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import qbdl.metrics as M

sk_metrics = pytest.importorskip("sklearn.metrics")


def _tied(seed: int, n: int = 240, s: int = 2, c: int = 4, atoms: int = 5):
    """MC predictions built from a few distinct rows, so every score has large tie groups."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.softmax(torch.randn(s, atoms, c, generator=g, dtype=torch.float64) * 2, -1)
    p = rows[:, torch.randint(0, atoms, (n,), generator=g)]
    y = torch.multinomial(p.mean(0), 1, generator=g).squeeze(1)
    return p, y


def _continuous(seed: int, n: int = 300, s: int = 1, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(s, n, c, generator=g, dtype=torch.float64) * 2, -1)
    y = torch.multinomial(p.mean(0), 1, generator=g).squeeze(1)
    return p, y


def _all_values(p, y, score):
    curve = M.referral_curve(p, y, score)
    acc = M.accuracy(p, y)
    return {
        "curve": curve.accuracy,
        "aurc": M.aurc(p, y, score),
        "eaurc": M.eaurc(p, y, score),
        "referral_auc": M.referral_auc(p, y, score),
        "rate": [M.referral_rate_at_accuracy(p, y, t, score) for t in (acc + 0.02, acc + 0.1, 0.99)],
        "augrc": M.augrc(p, y, score),
        "risk": [M.risk_at_coverage(p, y, c, score) for c in (0.5, 0.8, 0.9, 0.95)],
        "cov": [M.coverage_at_risk(p, y, r, score) for r in (0.05, 0.2, 0.4)],
        "ace": M.adaptive_calibration_error(p, y, 7),
    }


# ------------------------------------------------------------------------------------------------
# ties: expected value under random tie-breaking
# ------------------------------------------------------------------------------------------------
def test_hand_tied_case():
    # entropy: rows 1, 2 tie (0.673, most uncertain), then row 3 (0.500), then row 0 (0.325).
    # predictions all class 0; y makes correct = [1, 1, 0, 0].  Referral order: {1, 2} (mean
    # correctness 1/2 each), 3 (0), 0 (1).  Retained accuracy after k referrals:
    # k=0: 2/4; k=1: (2 - .5)/3 = .5 (orderings give 1/3 and 2/3); k=2: (2 - 1)/2; k=3: row 0 -> 1.
    p = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.6, 0.4], [0.8, 0.2]]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    c = M.referral_curve(p, y)
    torch.testing.assert_close(c.accuracy, torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64))
    assert M.aurc(p, y) == pytest.approx(0.375)
    assert M.eaurc(p, y) == pytest.approx(0.375 - (0.5 + 1 / 3) / 4)
    assert M.referral_auc(p, y) == pytest.approx(0.625)
    assert M.referral_rate_at_accuracy(p, y, 0.5) == 0.0
    assert M.referral_rate_at_accuracy(p, y, 0.6) == 0.75
    # generalized risk at coverage m/4, m = 0..4: 0, 0, .25, .375, .5 -> trapezoid area
    g = [0.0, 0.0, 0.25, 0.375, 0.5]
    assert M.augrc(p, y) == pytest.approx(sum((a + b) / 2 for a, b in zip(g, g[1:])) / 4)
    assert M.augrc(p, y) == pytest.approx(0.21875)
    # failure-detection AUROC: errors {2, 3} vs correct {0, 1}: (2>0) + (2=1)/2 + (3>0) + (3<1) = 2.5/4
    auroc_f, err = 0.625, 0.5
    assert M.augrc(p, y) == pytest.approx((1 - auroc_f) * (1 - err) * err + err**2 / 2)
    assert M.risk_at_coverage(p, y, 0.5) == pytest.approx(0.5)
    assert M.risk_at_coverage(p, y, 0.25) == 0.0
    assert M.risk_at_coverage(p, y, 1.0) == pytest.approx(0.5)
    assert M.coverage_at_risk(p, y, 0.0) == 0.25
    assert M.coverage_at_risk(p, y, 0.49) == 0.25
    assert M.coverage_at_risk(p, y, 0.5) == 1.0


def test_all_tied_scores_do_not_depend_on_order():
    # The old stable-order rule gave AURC 0.177 or 0.823 here depending on where the errors sit.
    p = torch.tensor([[[0.6, 0.4]] * 10], dtype=torch.float64)
    for y in ([1, 1, 1] + [0] * 7, [0] * 7 + [1, 1, 1]):
        y = torch.tensor(y)
        assert M.aurc(p, y) == pytest.approx(0.3)
        oracle_aurc = sum(max(0, 3 - k) / (10 - k) for k in range(10)) / 10
        assert M.eaurc(p, y) == pytest.approx(0.3 - oracle_aurc)
        # generalized risk is linear in coverage: 0.3 c -> area 0.15 = err^2/2 + (1 - 1/2) acc err
        assert M.augrc(p, y) == pytest.approx(0.15)
        assert M.risk_at_coverage(p, y, 0.8) == pytest.approx(0.3)
        assert M.coverage_at_risk(p, y, 0.29) == 0.0
        assert M.coverage_at_risk(p, y, 0.3) == 1.0
        assert M.referral_rate_at_accuracy(p, y, 0.71) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("score", ["entropy", "mi", "maxprob"])
def test_permutation_invariance_with_heavy_ties(seed, score):
    p, y = _tied(seed)
    assert len(torch.unique(M.uncertainty_scores(p, score))) <= 5  # really tied
    ref = _all_values(p, y, score)
    for k in range(3):
        perm = torch.randperm(p.shape[1], generator=torch.Generator().manual_seed(100 + k))
        got = _all_values(p[:, perm], y[perm], score)
        for key, val in ref.items():
            if isinstance(val, torch.Tensor):
                torch.testing.assert_close(got[key], val, rtol=0, atol=1e-12, msg=key)
            else:
                assert got[key] == pytest.approx(val, abs=1e-12), key


def test_tied_curve_is_the_mean_over_orderings():
    # brute force: average the stable-order curve over many random orderings of the tied points
    p, y = _tied(3, n=12, atoms=3)
    exact = M.referral_curve(p, y).accuracy
    scores = M.uncertainty_scores(p).numpy()
    correct = (p.mean(0).argmax(-1) == y).double().numpy()
    rng = np.random.default_rng(0)
    curves = []
    for _ in range(4000):
        key = rng.random(12)  # random tie-break key
        order = np.lexsort((key, -scores))
        c = correct[order]
        curves.append([c[k:].mean() for k in range(12)])
    np.testing.assert_allclose(np.mean(curves, 0), exact.numpy(), atol=0.03)


# ------------------------------------------------------------------------------------------------
# AUGRC
# ------------------------------------------------------------------------------------------------
def _augrc_paper(confidence: np.ndarray, error: np.ndarray) -> float:
    """Traub et al. 2024: accept all points with confidence >= t; GR = #errors accepted / N vs coverage.

    RC points at every distinct threshold plus (0, 0), joined linearly, integrated by the trapezoid rule.
    """
    n = len(error)
    thresholds = np.unique(confidence)[::-1]
    cov = [0.0] + [np.mean(confidence >= t) for t in thresholds]
    gr = [0.0] + [np.sum(error[confidence >= t]) / n for t in thresholds]
    return float(np.sum(np.diff(cov) * (np.array(gr[1:]) + np.array(gr[:-1])) / 2))


@pytest.mark.parametrize("case", ["continuous", "tied", "tied_mc"])
@pytest.mark.parametrize("score", ["entropy", "mi", "maxprob"])
def test_augrc_matches_paper_definition_and_auroc_identity(case, score):
    p, y = {"continuous": _continuous(0, s=3), "tied": _tied(1, s=1), "tied_mc": _tied(2, s=3)}[case]
    s = M.uncertainty_scores(p, score).numpy()
    err = (p.mean(0).argmax(-1) != y).double().numpy()
    ours = M.augrc(p, y, score)
    assert ours == pytest.approx(_augrc_paper(-s, err), abs=1e-12)
    # AUGRC = (1 - AUROC_f) acc (1 - acc) + (1 - acc)^2 / 2, AUROC_f separating errors by the score
    e = err.mean()
    auroc_f = sk_metrics.roc_auc_score(err, s) if 0 < e < 1 else 0.5
    assert ours == pytest.approx((1 - auroc_f) * (1 - e) * e + e**2 / 2, abs=1e-12)


def _tu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torch_uncertainty.metrics.classification")


@pytest.mark.parametrize("seed", [0, 1])
def test_selective_metrics_match_torch_uncertainty(seed):
    tu = _tu()
    p, y = _continuous(seed, n=400)
    pbar = p[0]  # S = 1, float64, no ties: max-prob confidence orders exactly as our "maxprob" score
    n = pbar.shape[0]
    err = (pbar.argmax(-1) != y).double()
    ref = tu.AUGRC()
    ref.update(pbar, y)
    # torch-uncertainty integrates GR over coverages 1/n .. 1 (no (0, 0) point) and divides by 1 - 1/n:
    # AUGRC_tu (1 - 1/n) = AUGRC_ours - GR(1/n) / (2n), GR(1/n) = error of the most confident point / n
    g1 = float(err[pbar.max(-1).values.argmax()]) / n
    ours = M.augrc(p, y, "maxprob")
    # (torch-uncertainty's coverage grid is float32, hence the 1e-7 tolerance)
    assert float(ref.compute()) * (1 - 1 / n) == pytest.approx(ours - g1 / (2 * n), abs=1e-7)
    assert abs(float(ref.compute()) - ours) < 2 / n
    for cov in (0.8, 0.9, 0.95, 0.5):
        r = tu.RiskAtxCov(cov_threshold=cov)
        r.update(pbar, y)
        assert M.risk_at_coverage(p, y, cov, "maxprob") == pytest.approx(float(r.compute()), abs=1e-12)
    for risk in (0.05, 0.1, 0.2, 0.3):
        r = tu.CovAtxRisk(risk_threshold=risk)
        r.update(pbar, y)
        expected = float(r.compute())
        expected = 0.0 if math.isnan(expected) else expected  # torch-uncertainty: NaN when unreachable
        assert M.coverage_at_risk(p, y, risk, "maxprob") == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("case", ["continuous", "tied"])
def test_risk_and_coverage_match_naive_expectation(case):
    p, y = _continuous(4, n=97) if case == "continuous" else _tied(4, n=97)
    s = M.uncertainty_scores(p).numpy()
    correct = (p.mean(0).argmax(-1) == y).double().numpy()
    n = len(s)

    def expected_errors_accepted(m: int) -> float:
        # accept the m least uncertain points; a tie group cut by the boundary contributes pro rata
        total, left = 0.0, m
        for v in np.unique(s):  # ascending uncertainty
            grp = correct[s == v]
            take = min(left, len(grp))
            total += take * (1 - grp.mean())
            left -= take
            if left == 0:
                break
        return total

    risks = {m: expected_errors_accepted(m) / m for m in range(1, n + 1)}
    for cov in (0.1, 0.5, 0.8, 0.9, 0.95, 1.0):
        m = math.ceil(cov * n - 1e-9)
        assert M.risk_at_coverage(p, y, cov) == pytest.approx(risks[m], abs=1e-12)
    for r in (0.0, 0.05, 0.1, 0.2, 0.5):
        ok = [m for m, v in risks.items() if v <= r + 1e-12]
        assert M.coverage_at_risk(p, y, r) == pytest.approx(max(ok) / n if ok else 0.0)


def test_selective_options_are_validated():
    p, y = _tied(0, n=10)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="coverage"):
            M.risk_at_coverage(p, y, bad)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="risk"):
            M.coverage_at_risk(p, y, bad)
    with pytest.raises(ValueError, match="unknown uncertainty score"):
        M.augrc(p, y, "energy")


# ------------------------------------------------------------------------------------------------
# adaptive (equal-mass) calibration error
# ------------------------------------------------------------------------------------------------
def test_adaptive_ece_hand_case():
    # confidences (sorted) .55 .6 .7 .8 .9 .95 ; correct 0 1 1 0 1 1 ; 3 bins of 2 points
    conf = [0.9, 0.55, 0.7, 0.95, 0.6, 0.8]
    correct = [1, 0, 1, 1, 1, 0]
    p = torch.tensor([[[c, 1 - c] for c in conf]], dtype=torch.float64)
    y = torch.tensor([0 if k else 1 for k in correct])
    expected = (2 * abs(0.5 - 0.575) + 2 * abs(0.5 - 0.75) + 2 * abs(1 - 0.925)) / 6
    assert M.adaptive_calibration_error(p, y, n_bins=3) == pytest.approx(expected)
    # 4 bins of sizes 2, 2, 1, 1 (torch.tensor_split), and more bins than points (one point per bin)
    expected4 = (2 * abs(0.5 - 0.575) + 2 * abs(0.5 - 0.75) + abs(1 - 0.9) + abs(1 - 0.95)) / 6
    assert M.adaptive_calibration_error(p, y, n_bins=4) == pytest.approx(expected4)
    per_point = np.mean([abs(k - c) for k, c in zip(correct, conf)])
    assert M.adaptive_calibration_error(p, y, n_bins=15) == pytest.approx(per_point)
    # a tie straddling a bin edge shares its mean correctness: two 0.7 points, one right, one wrong
    p2 = torch.tensor([[[0.6, 0.4], [0.7, 0.3], [0.7, 0.3], [0.8, 0.2]]], dtype=torch.float64)
    y2 = torch.tensor([0, 0, 1, 0])
    expected_tie = (2 * abs(0.75 - 0.65) + 2 * abs(0.75 - 0.75)) / 4
    assert M.adaptive_calibration_error(p2, y2, n_bins=2) == pytest.approx(expected_tie)
    # the other tied point wrong instead: same value
    assert M.adaptive_calibration_error(p2, torch.tensor([0, 1, 0, 0]), 2) == pytest.approx(expected_tie)


@pytest.mark.parametrize(
    ("n", "n_bins", "c", "s"), [(300, 15, 5, 1), (301, 15, 10, 1), (1000, 10, 3, 4), (47, 15, 4, 2)]
)
def test_adaptive_ece_matches_torch_uncertainty(n, n_bins, c, s):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tu_cal = pytest.importorskip("torch_uncertainty.metrics.classification")
    g = torch.Generator().manual_seed(n)
    p = torch.softmax(torch.randn(s, n, c, generator=g, dtype=torch.float64) * 2, -1)
    y = torch.multinomial(p.mean(0), 1, generator=g).squeeze(1)
    ref = tu_cal.AdaptiveCalibrationError(task="multiclass", num_classes=c, num_bins=n_bins, norm="l1")
    ref.update(p.mean(0), y)
    # torch-uncertainty stores float32 confidences: agreement to float32 round-off
    assert M.adaptive_calibration_error(p, y, n_bins) == pytest.approx(float(ref.compute()), abs=1e-6)


@pytest.mark.parametrize(("n", "n_bins"), [(300, 15), (150, 10), (9, 15)])
def test_adaptive_ece_matches_netcal_when_bins_divide_evenly(n, n_bins):
    # netcal's equal-mass ECE places quantile edges; they coincide with equal-count bins when n_bins | n
    netcal_metrics = pytest.importorskip("netcal.metrics")
    g = torch.Generator().manual_seed(n + 1)
    p = torch.softmax(torch.randn(1, n, 4, generator=g, dtype=torch.float64) * 2, -1)
    y = torch.multinomial(p[0], 1, generator=g).squeeze(1)
    ref = netcal_metrics.ECE(bins=n_bins, equal_intervals=False).measure(p[0].numpy(), y.numpy())
    assert M.adaptive_calibration_error(p, y, n_bins) == pytest.approx(float(ref), abs=1e-12)
