"""torchmetrics Metric classes: accumulating several batches must equal the pure function on all data."""

from __future__ import annotations

import pytest
import torch

import qbdl.metrics as M


def _data(seed: int, s: int = 3, n: int = 257, c: int = 5, discrete: bool = False):
    g = torch.Generator().manual_seed(seed)
    if discrete:
        # few distinct rows -> many tied scores, also across batch boundaries
        atoms = torch.softmax(torch.randn(s, 4, c, generator=g) * 2, -1)
        p = atoms[:, torch.randint(0, 4, (n,), generator=g)]
    else:
        p = torch.softmax(torch.randn(s, n, c, generator=g) * 2, -1)
    # labels drawn from the predictive distribution (a calibrated model), so uncertainty is informative
    y = torch.multinomial(p.mean(0), 1, generator=g).squeeze(1)
    return p, y


def _batches(n: int, sizes=(1, 50, 100, 33)):
    start, out = 0, []
    i = 0
    while start < n:
        stop = min(n, start + sizes[i % len(sizes)])
        out.append(slice(start, stop))
        start, i = stop, i + 1
    return out


def _feed(metric, p, y):
    for sl in _batches(p.shape[1]):
        metric.update(p[:, sl], y[sl])
    return metric


@pytest.mark.parametrize("discrete", [False, True])
def test_sum_state_metrics_match_functional(discrete):
    p, y = _data(0, discrete=discrete)
    cases = [
        (M.MCAccuracy(), M.accuracy),
        (M.MCNLL(), M.nll),
        (M.MCBrier(), M.brier),
    ]
    for metric, fn in cases:
        assert float(_feed(metric, p, y).compute()) == pytest.approx(fn(p, y), rel=1e-12, abs=1e-12)
    mi = _feed(M.MeanMutualInformation(), p, y)
    # the metric accumulates in float64; the functional returns p's dtype, so compare in float64
    assert float(mi.compute()) == pytest.approx(float(M.mutual_information(p.double()).mean()), rel=1e-12)


@pytest.mark.parametrize("n_bins", [15, 7])
def test_calibration_metrics_match_functional(n_bins):
    p, y = _data(1)
    # include saturated rows so the torchmetrics "confidence == 1" bucket is exercised
    p[:, :20] = torch.nn.functional.one_hot(torch.arange(20) % 5, 5).float()
    ece = _feed(M.ExpectedCalibrationError(n_bins=n_bins), p, y)
    assert float(ece.compute()) == pytest.approx(M.expected_calibration_error(p, y, n_bins), abs=1e-12)
    assert float(ece.compute_max()) == pytest.approx(M.maximum_calibration_error(p, y, n_bins), abs=1e-12)
    uce = _feed(M.UncertaintyCalibrationError(n_bins=n_bins), p, y)
    assert float(uce.compute()) == pytest.approx(M.uncertainty_calibration_error(p, y, n_bins), abs=1e-12)
    assert float(uce.compute_max()) == pytest.approx(
        M.maximum_uncertainty_calibration_error(p, y, n_bins), abs=1e-12
    )


def test_ece_class_matches_torchmetrics_class():
    from torchmetrics.classification import MulticlassCalibrationError

    p, y = _data(2, s=1, c=10)
    ours, ref = M.ExpectedCalibrationError(), MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    for sl in _batches(p.shape[1]):
        ours.update(p[:, sl], y[sl])
        ref.update(p[0, sl], y[sl])
    assert float(ours.compute()) == pytest.approx(float(ref.compute()), abs=1e-6)


@pytest.mark.parametrize(
    ("discrete", "score"), [(False, "entropy"), (True, "entropy"), (True, "mi"), (False, "maxprob")]
)
def test_ranking_metrics_match_functional(discrete, score):
    p, y = _data(3, discrete=discrete)
    acc = M.accuracy(p, y)
    for target in (acc + 0.05, (1 + acc) / 2, 0.999, acc - 0.1):
        rr = _feed(M.ReferralRate(target=target, score=score), p, y)
        assert float(rr.compute()) == M.referral_rate_at_accuracy(p, y, target, score=score)
    a = _feed(M.AURC(score=score), p, y)
    assert float(a.compute()) == pytest.approx(M.aurc(p, y, score=score), abs=1e-12)
    assert float(a.compute_excess()) == pytest.approx(M.eaurc(p, y, score=score), abs=1e-12)
    if score == "mi":
        return  # with 4 distinct rows, MI need not order them by correctness
    # target above the accuracy -> needs a real referral fraction strictly between 0 and 1
    assert 0.0 < float(_feed(M.ReferralRate(target=acc + 0.05, score=score), p, y).compute()) < 0.5


@pytest.mark.parametrize("score", ["entropy", "mi"])
def test_ood_auroc_class_matches_functional(score):
    p_in, _ = _data(4, discrete=True)
    p_out = torch.softmax(torch.randn(3, 90, 5, generator=torch.Generator().manual_seed(9)) * 0.7, -1)
    metric = M.OODAUROC(score=score)
    for sl in _batches(p_in.shape[1]):
        metric.update(p_in[:, sl], False)
    for sl in _batches(p_out.shape[1], sizes=(40,)):
        metric.update(p_out[:, sl], True)
    assert float(metric.compute()) == pytest.approx(M.ood_auroc(p_in, p_out, score=score), abs=1e-12)
    # per-point labels give the same answer
    per_point = M.OODAUROC(score=score)
    both = torch.cat([p_in, p_out], 1)
    labels = torch.cat(
        [torch.zeros(p_in.shape[1], dtype=torch.bool), torch.ones(p_out.shape[1], dtype=torch.bool)]
    )
    per_point.update(both, labels)
    assert float(per_point.compute()) == pytest.approx(float(metric.compute()), abs=1e-12)


def test_reset_and_state_registration():
    p, y = _data(5)
    m = M.MCAccuracy()
    m.update(p, y)
    m.reset()
    m.update(p[:, :10], y[:10])
    assert float(m.compute()) == pytest.approx(M.accuracy(p[:, :10], y[:10]))
    # states are registered (and therefore synced under DDP) with the documented reductions
    assert m._reductions["total"] is not None and set(m._defaults) == {"total", "count"}
    assert set(M.AURC()._defaults) == {"scores", "correct"}
    assert set(M.ExpectedCalibrationError(n_bins=15)._defaults["bin_count"].shape) == {16}


def test_metric_classes_validate_input():
    with pytest.raises(ValueError, match="sum to 1"):
        M.MCNLL().update(torch.full((1, 4, 3), 0.5), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="shape mismatch"):
        M.AURC().update(torch.full((1, 4, 3), 1 / 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown uncertainty score"):
        M.ReferralRate(target=0.9, score="bogus")
    with pytest.raises(ValueError, match="is_ood"):
        M.OODAUROC().update(torch.full((1, 4, 3), 1 / 3), torch.tensor([True, False]))


@pytest.mark.parametrize(("discrete", "score"), [(False, "entropy"), (True, "entropy"), (True, "maxprob")])
def test_selective_metric_classes_match_functional(discrete, score):
    p, y = _data(6, discrete=discrete)
    augrc = _feed(M.AUGRC(score=score), p, y)
    assert float(augrc.compute()) == pytest.approx(M.augrc(p, y, score=score), abs=1e-12)
    for cov in (0.8, 0.9, 0.95):
        m = _feed(M.RiskAtCoverage(coverage=cov, score=score), p, y)
        assert float(m.compute()) == pytest.approx(M.risk_at_coverage(p, y, cov, score=score), abs=1e-12)
    for risk in (0.05, 0.2, 0.4):
        m = _feed(M.CoverageAtRisk(risk=risk, score=score), p, y)
        assert float(m.compute()) == pytest.approx(M.coverage_at_risk(p, y, risk, score=score), abs=1e-12)
    # ties are random in expectation: the update order (e.g. a DDP gather order) does not matter
    rev = M.AUGRC(score=score)
    for sl in reversed(_batches(p.shape[1])):
        rev.update(p[:, sl], y[sl])
    assert float(rev.compute()) == pytest.approx(float(augrc.compute()), abs=1e-12)


@pytest.mark.parametrize(("discrete", "n_bins"), [(False, 15), (True, 15), (False, 4)])
def test_adaptive_calibration_class_matches_functional(discrete, n_bins):
    p, y = _data(7, discrete=discrete)
    ace = _feed(M.AdaptiveCalibrationError(n_bins=n_bins), p, y)
    expected = M.adaptive_calibration_error(p, y, n_bins)
    assert float(ace.compute()) == pytest.approx(expected, abs=1e-12)
    rev = M.AdaptiveCalibrationError(n_bins=n_bins)
    for sl in reversed(_batches(p.shape[1])):
        rev.update(p[:, sl], y[sl])
    assert float(rev.compute()) == pytest.approx(expected, abs=1e-12)
    assert set(rev._defaults) == {"confidence", "correct"}
    with pytest.raises(ValueError, match="coverage"):
        M.RiskAtCoverage(coverage=0.0)
    with pytest.raises(ValueError, match="risk"):
        M.CoverageAtRisk(risk=1.5)
