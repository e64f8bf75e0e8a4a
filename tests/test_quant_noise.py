"""INT8 fresh-sampling noise: each layer its own stream, successive MC samples on windows that never overlap."""

import numpy as np
import pytest
import torch
from torch import nn

from qbdl.bayes import dnn_to_bnn, set_mc_index
from qbdl.quant import calibrate, convert, noise, prepare, quant_layers

N_IN = 256  # two 256x256 linears: 65,536 weights each, equal sizes (the case that shared one pool before)


@pytest.fixture(scope="module")
def qbnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(N_IN, N_IN), nn.ReLU(), nn.Linear(N_IN, N_IN), nn.ReLU(), nn.Linear(N_IN, 4)
    )
    bnn = dnn_to_bnn(net).eval()
    for i in (0, 2):  # mu ~ 0, sigma = 1: sigma/S = 42 int8 steps, so w/(sigma/S) ~ z up to rounding
        layer = bnn[i]
        layer.set_posterior(
            torch.zeros_like(layer.mu_weight) + 1e-3 * torch.randn_like(layer.mu_weight),
            torch.ones_like(layer.mu_weight),
            layer.mu_bias,
            layer.sigma_bias,
        )
    prep = calibrate(prepare(bnn), [torch.randn(32, N_IN)], mc_samples=2)
    q = convert(prep, sampler="fresh", seed=5)
    with torch.no_grad():
        q(torch.randn(2, N_IN))  # builds the in-place samplers (the default fresh path)
    return q


def _noise(layer, index: int) -> torch.Tensor:
    """Standardised noise of MC sample `index`: (w - mu/S) / (sigma/S), flattened, centred, unit variance."""
    set_mc_index(layer, index)
    try:
        w = layer.sampled_int8_weight().double()
    finally:
        set_mc_index(layer, None)
    s = layer.weight_scale().double().view(-1, 1)
    mu = layer.mu_q.double() * layer.mu_scale.double().view(-1, 1) / s
    sig = layer.sigma_q.double() * layer.sigma_scale.double().view(-1, 1) / s
    e = ((w - mu) / sig).flatten()
    return (e - e.mean()) / e.std()


def _max_xcorr(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over every lag k of |sum_i a_i b_(i+k)| / n (circular-free: zero-padded FFT; numpy's is 20x faster)."""
    n = a.numel()
    fa, fb = np.fft.rfft(a.numpy(), 2 * n), np.fft.rfft(b.numpy(), 2 * n)
    return float(np.abs(np.fft.irfft(fa.conj() * fb, 2 * n)).max() / n)


def test_sixteen_samples_of_one_layer_and_of_two_equal_layers_are_uncorrelated_at_every_lag(qbnn):
    first, second = [m for m in quant_layers(qbnn) if m.mu_q.shape == (N_IN, N_IN)]
    assert first.noise_slots == noise.NOISE_SLOTS == 16
    s = 16
    za = [_noise(first, i) for i in range(s)]
    zb = [_noise(second, i) for i in range(s)]
    n = za[0].numel()
    # iid: each lag's value ~ N(0, 1/n); over ~2n lags x 376 pairs the max stays below ~6 sd
    tol = 6.5 / n**0.5
    pairs = [(za[i], za[j]) for i in range(s) for j in range(i + 1, s)]
    pairs += [(za[i], zb[j]) for i in range(s) for j in range(s)]
    worst = max(_max_xcorr(a, b) for a, b in pairs)
    assert worst < tol, (worst, tol)
    # the check has teeth: a window that overlaps another by a tenth, shifted, is caught
    shifted = torch.cat([za[0][-n // 10 :], za[1][: n - n // 10]])
    assert _max_xcorr(za[0], shifted) > 0.09
    # and the noise is really there: ~42 int8 steps of it per weight
    assert first.sampled_int8_weight().double().std() > 30


def test_sample_past_the_slots_reuses_a_window_with_an_independent_sign(qbnn):
    layer = quant_layers(qbnn)[0]
    signs = []
    for seed in range(16):
        torch.manual_seed(seed)
        a = _noise(layer, 3)
        torch.manual_seed(1000 + seed)
        b = _noise(layer, 3 + layer.noise_slots)
        c = float((a * b).mean())
        assert abs(abs(c) - 1) < 0.02  # the same window...
        signs.append(c > 0)
    assert 2 <= sum(signs) <= 14  # ...with a sign of its own: uncorrelated on average (P(fail) < 0.5%)
