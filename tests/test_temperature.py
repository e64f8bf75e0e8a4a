"""Temperature scaling of MC logits: agreement with scipy, netcal and torch-uncertainty; optimality."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

import qbdl.metrics as M

scipy_optimize = pytest.importorskip("scipy.optimize")
scipy_special = pytest.importorskip("scipy.special")


def _np_nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    """NLL of mean_s softmax(logits_s / T), written independently in numpy."""
    probs = scipy_special.softmax(logits / t, axis=-1).mean(0)  # [B, C]
    return float(-np.log(probs[np.arange(len(y)), y]).mean())


def _scipy_fit(logits: torch.Tensor, y: torch.Tensor, bounds=(0.05, 20.0)) -> float:
    lg, yy = logits.double().numpy(), y.numpy()
    res = scipy_optimize.minimize_scalar(
        lambda u: _np_nll(lg, yy, math.exp(u)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return math.exp(res.x)


def _overconfident(seed: int, k: float, n: int = 3000, c: int = 10, s: int = 1, noise: float = 0.0):
    """Labels drawn from softmax(z); the model reports k * z (+ per-sample noise): T* ~ k."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    logits = k * z + noise * torch.randn(s, n, c, generator=g, dtype=torch.float64)
    return logits, y


def test_s1_matches_scipy_netcal_and_torch_uncertainty(caplog):
    logits, y = _overconfident(0, 2.5)
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(_scipy_fit(logits, y), rel=1e-6)
    # netcal 1.4.0 TemperatureScaling (scipy minimize on the inverse softmax); its `weights` /
    # `temperature` attribute is the multiplier 1/T of the logits
    netcal_scaling = pytest.importorskip("netcal.scaling")
    nc = netcal_scaling.TemperatureScaling()
    nc.fit(torch.softmax(logits[0], -1).numpy(), y.numpy())
    assert 1.0 / float(np.asarray(nc.weights).ravel()[0]) == pytest.approx(t, abs=1e-4)
    # torch-uncertainty 0.13.0 TemperatureScaler (float LBFGS on 1/T); its default lr=0.1, max_iter=100
    # stops ~2e-4 short of the optimum here, so use lr=1 to converge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = pytest.importorskip("torch_uncertainty.post_processing")
    from torch.utils.data import DataLoader, TensorDataset

    caplog.set_level(logging.ERROR)  # "model is None. Fitting ... on the dataloader's data directly"
    ts = post.TemperatureScaler(lr=1.0, max_iter=200)
    ts.fit(DataLoader(TensorDataset(logits[0], y), batch_size=1000), progress=False)
    assert float(ts.temperature[0].detach()) == pytest.approx(t, abs=1e-4)


@pytest.mark.parametrize(("k", "s", "noise"), [(2.5, 1, 0.0), (0.6, 1, 0.0), (1.5, 4, 1.0)])
def test_fitted_temperature_is_a_minimum(k, s, noise):
    logits, y = _overconfident(1, k, n=800, s=s, noise=noise)
    t = M.fit_temperature(logits, y)
    best = M.temperature_nll(logits, y, t)
    for other in (1.0, t * 1.1, t / 1.1, t * 1.001, t / 1.001):
        assert best <= M.temperature_nll(logits, y, other)
    # the objective is the NLL of the MC-averaged tempered predictive, as written in numpy
    assert best == pytest.approx(_np_nll(logits.numpy(), y.numpy(), t), rel=1e-12)
    assert M.nll(M.apply_temperature(logits, t), y) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("k", [3.0, 0.5])
def test_recovers_known_overconfidence_factor(k):
    logits, y = _overconfident(2, k, n=4000)
    assert M.fit_temperature(logits, y) == pytest.approx(k, rel=0.05)


def test_mc_samples_match_scipy_objective():
    # S > 1: T divides each sample's logits before the average; compare with scipy on the same NLL
    logits, y = _overconfident(3, 2.0, n=600, s=4, noise=2.0)
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(_scipy_fit(logits, y), rel=1e-6)
    # not the same as tempering the MC-mean logit
    mean_only = M.fit_temperature(logits.mean(0, keepdim=True), y)
    assert abs(mean_only - t) > 1e-3


def test_bounds_determinism_dtype_and_apply():
    logits, y = _overconfident(4, 2.0, n=500)
    t = M.fit_temperature(logits, y)
    assert M.fit_temperature(logits, y) == t  # deterministic
    assert M.fit_temperature(logits.float(), y) == pytest.approx(t, rel=1e-5)
    # optimum outside the bounds -> the nearest bound
    assert M.fit_temperature(logits, y, bounds=(0.05, 1.0)) == pytest.approx(1.0, rel=1e-6)
    assert M.fit_temperature(logits, y, bounds=(3.0, 20.0)) == pytest.approx(3.0, rel=1e-6)
    correct_only = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])
    assert M.fit_temperature(correct_only, torch.tensor([0, 1])) == pytest.approx(0.05, rel=1e-6)
    assert M.fit_temperature(correct_only, torch.tensor([1, 0])) == pytest.approx(20.0, rel=1e-6)
    probs = M.apply_temperature(logits.float(), 2.0)
    assert probs.shape == logits.shape and probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits.float() / 2.0, -1))
    torch.testing.assert_close(M.apply_temperature(logits, 1.0), torch.softmax(logits, -1))


def test_invalid_inputs_raise():
    logits, y = _overconfident(5, 1.0, n=20)
    with pytest.raises(ValueError, match="bounds"):
        M.fit_temperature(logits, y, bounds=(0.0, 2.0))
    with pytest.raises(ValueError, match="bounds"):
        M.fit_temperature(logits, y, bounds=(3.0, 2.0))
    with pytest.raises(ValueError, match=r"\[S, B, C\]"):
        M.fit_temperature(logits[0], y)
    with pytest.raises(ValueError, match="NaN"):
        M.fit_temperature(torch.full_like(logits, float("nan")), y)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.fit_temperature(logits, y[:5])
    with pytest.raises(ValueError, match="temperature"):
        M.apply_temperature(logits, 0.0)
