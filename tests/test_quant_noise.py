"""INT8 counter noise (qbdl.quant.noise): exact integers against independent implementations, its law against
N(0,1) on the grid, independence across MC indices, layers and neighbouring weights, reproducibility by seed,
and each weight's sample mean and variance against the FP32 BNN's."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from qbdl.bayes import dnn_to_bnn, set_mc_index
from qbdl.quant import calibrate, convert, native, noise, prepare, quant_layers

N_IN = 256  # two 256x256 linears: 65,536 weights each, equal sizes (the case that shared one pool once)
M32 = 0xFFFFFFFF


def _lowbias32_py(x: int) -> int:
    """lowbias32 on Python ints: a third implementation beside the torch reference and the C++ kernel."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def test_hash_matches_a_plain_python_implementation_at_every_bit():
    for k in (0, 1, noise.key(0, 0, 0), noise.key(7, 3, 2**40, random=True), 2**64 - 1):
        pos = [0, 1, 2, 4095, 4096, 2**31, 2**32 - 1]
        want = [_lowbias32_py(_lowbias32_py((p + (k & M32)) & M32) ^ (k >> 32)) for p in pos]
        assert noise.hash32(k, torch.tensor(pos)).tolist() == want
    # lowbias32's published property: 0 -> 0, and one known value of the mixer
    assert _lowbias32_py(0) == 0


def test_hand_computed_sample():
    # two weights, mu/S = 5 (mu16 = 5 * 2^8), sigma/S = 0.5 (sg16 = 2^8):
    # v = (1280 * 2^7 + 256 * z64 + 2^14) >> 15 = floor(5 + z64 / 128 + 1/2): round(5 + z / 2), halves up
    mu, sg = torch.tensor([1280, 1280], dtype=torch.int16), torch.tensor([256, 256], dtype=torch.int16)
    k = noise.key(1, 2, 3)
    z = noise.z_grid(k, 2).tolist()
    want = [math.floor(5 + zz / 128 + 0.5) for zz in z]
    assert noise.sample_reference(mu, sg, k).tolist() == want


@pytest.mark.skipif(not native.available(), reason="qbdl's C++ ops are not built here")
def test_cpp_sample_equals_the_torch_reference():
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 3, 3, 3), (10, 7), (1, 1), (5000,)]:
        mu = torch.randint(-127 * 256, 127 * 256, shape, dtype=torch.int16, generator=g)
        sg = torch.randint(0, 43 * 512, shape, dtype=torch.int16, generator=g)
        for k in (0, 2**64 - 1, noise.key(5, 3, 7)):
            assert torch.equal(noise.sample_int8(mu, sg, k), noise.sample_reference(mu, sg, k))


def test_operands_are_mu_and_sigma_in_fixed_point():
    mu = torch.tensor([[0.5, -1.0], [0.02, 0.0]])
    sigma = torch.tensor([[0.1, 0.2], [0.01, 0.03]])
    s = noise.sample_scale(mu, sigma)  # (1 + 0.6) / 127 and (0.03 + 0.09) / 127
    mu16, sg16 = noise.operands(mu, sigma, s)
    assert torch.allclose(mu16.double() / 256, mu.double() / s.double().view(-1, 1), atol=1 / 512)
    assert torch.allclose(sg16.double() / 512, sigma.double() / s.double().view(-1, 1), atol=1 / 1024)
    assert int(mu16[0, 1]) == round(-1.0 / (1.6 / 127) * 256)


def _normal_cells() -> torch.Tensor:
    """P(round(64 Z) = k), k = -255..255, Z ~ N(0,1), the two ends holding the tails beyond (the cap)."""
    edges = (torch.arange(-255, 257, dtype=torch.float64) - 0.5) / 64
    cdf = torch.special.ndtr(edges)
    p = cdf[1:] - cdf[:-1]
    p[0] += cdf[0]
    p[-1] += 1 - cdf[-1]
    return p


def _chi2_pvalue(counts: np.ndarray, p: np.ndarray, min_expected: float = 20.0) -> float:
    """Chi-square goodness-of-fit p-value, adjacent cells merged (left to right) until each expects >= min_expected."""
    exp = p * counts.sum()
    c, e, acc_c, acc_e = [], [], 0.0, 0.0
    for ci, ei in zip(counts, exp, strict=True):
        acc_c, acc_e = acc_c + ci, acc_e + ei
        if acc_e >= min_expected:
            c.append(acc_c), e.append(acc_e)
            acc_c = acc_e = 0.0
    c[-1], e[-1] = c[-1] + acc_c, e[-1] + acc_e
    c, e = np.array(c), np.array(e)
    return float(stats.chi2.sf(((c - e) ** 2 / e).sum(), len(c) - 1))


def test_marginal_law_is_normal_on_the_grid():
    # the law itself: every grid probability within 2^-16 of N(0,1)'s (16 uniform bits), cap at 255/64
    p_gen, p_norm = noise.grid_probabilities(), _normal_cells()
    assert float((p_gen - p_norm).abs().max()) <= 2**-16 + 1e-12
    assert abs(noise.table_variance() - 1) < 1e-3 and noise.max_abs_z() == 255 / 64
    # a sample of 2^20 values (fixed key): chi-square against the generator's exact law, every cell expecting
    # >= 20 (tests the hash's uniformity), and against N(0,1) on the grid with cells expecting >= 1000: the
    # table resolves probabilities to 2^-16 (16 counts here), which the finer tail cells would show
    z = noise.z_grid(noise.key(0, 0, 0), 1 << 20).long() + 255
    counts = torch.bincount(z, minlength=511).numpy()
    assert _chi2_pvalue(counts, p_gen.numpy()) > 1e-3
    assert _chi2_pvalue(counts, p_norm.numpy(), min_expected=1000) > 1e-3
    # power: the N(0,1) test rejects a law whose sd is 1% off (z * 1.01, re-rounded) at p < 1e-6
    wide = (noise.z_grid(noise.key(0, 0, 0), 1 << 20).double() * 1.01).round().clamp(-255, 255).long() + 255
    assert _chi2_pvalue(torch.bincount(wide, minlength=511).numpy(), p_norm.numpy(), min_expected=1000) < 1e-6


def _xcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|sum_i a_i b_(i+k)| / n at every lag k (zero-padded FFT)."""
    n = len(a)
    fa, fb = np.fft.rfft(a, 2 * n), np.fft.rfft(b, 2 * n)
    return np.abs(np.fft.irfft(fa.conj() * fb, 2 * n)) / n


def _std(x: torch.Tensor) -> np.ndarray:
    x = x.double().flatten()
    return ((x - x.mean()) / x.std()).numpy()


def test_streams_of_mc_indices_layers_and_seeds_are_uncorrelated_at_every_lag():
    n = 1 << 16
    streams = [noise.z_grid(noise.key(0, layer, i), n) for layer in (0, 1) for i in range(12)]
    streams += [noise.z_grid(noise.key(1, 0, 0), n), noise.z_grid(noise.key(0, 0, 0, random=True), n)]
    zs = [_std(z) for z in streams]
    # iid: each lag's value ~ N(0, 1/n); over ~2n lags x 325 pairs the max stays below ~6 sd
    tol = 6.5 / n**0.5
    worst = max(float(_xcorr(zs[i], zs[j]).max()) for i in range(len(zs)) for j in range(i + 1, len(zs)))
    assert worst < tol, (worst, tol)
    # neighbouring weights of one sample: autocorrelation at lags 1..4096
    auto = max(float(_xcorr(z, z)[1:4097].max()) for z in zs)
    assert auto < 5.5 / n**0.5, auto
    # the check has teeth: a stream overlapping another by a tenth, shifted, is caught
    shifted = np.concatenate([zs[0][-n // 10 :], zs[1][: n - n // 10]])
    assert float(_xcorr(zs[0], shifted).max()) > 0.09


@pytest.fixture(scope="module")
def qbnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(N_IN, N_IN), nn.ReLU(), nn.Linear(N_IN, N_IN), nn.ReLU(), nn.Linear(N_IN, 4)
    )
    bnn = dnn_to_bnn(net, moped_delta=0.5).eval()
    prep = calibrate(prepare(bnn), [torch.randn(32, N_IN)], mc_samples=2)
    q = convert(prep, sampler="fresh", seed=5)
    with torch.no_grad():
        q(torch.randn(2, N_IN))  # builds the in-place samplers (the default fresh path)
    return bnn, q


def _sample(layer, index):
    set_mc_index(layer, index)
    try:
        return layer.sampled_int8_weight()
    finally:
        set_mc_index(layer, None)


def test_the_in_place_path_samples_uncorrelated_noise_across_indices_and_layers(qbnn):
    _, q = qbnn
    first, second = [m for m in quant_layers(q) if m.mu_q.shape == (N_IN, N_IN)]
    assert first.inplace_sampler is not None and second.inplace_sampler is not None

    def z(layer, i):  # standardised noise of MC sample i: (w - E w) / sd, flattened
        w = _sample(layer, i).double()
        return _std(w - _mu_s(layer))

    za = [z(first, i) for i in range(6)] + [z(second, i) for i in range(6)]
    n = len(za[0])
    worst = max(float(_xcorr(za[i], za[j]).max()) for i in range(12) for j in range(i + 1, 12))
    assert worst < 6.5 / n**0.5, worst
    # MC index 20 is not index 4 again (no cycle of 16 windows any more)
    assert abs(float(np.dot(z(first, 4), z(first, 20))) / n) < 5 / n**0.5


def _mu_s(layer) -> torch.Tensor:
    """mu / S of a layer's weights (in int8 steps of the sampled weight)."""
    s = layer.weight_scale().double().view(-1, *[1] * (layer.mu_q.dim() - 1))
    return layer.mu_q.double() * layer.mu_scale.double().view_as(s) / s


def test_samples_reproduce_by_seed_and_mc_index(qbnn):
    _, q = qbnn
    layer = quant_layers(q)[0]
    torch.manual_seed(3)
    a = layer.sampled_int8_weight()
    torch.manual_seed(3)
    b = layer.sampled_int8_weight()
    c = layer.sampled_int8_weight()
    assert torch.equal(a, b) and not torch.equal(b, c)
    # an MC index decides the sample whatever the global generator's state
    torch.manual_seed(0)
    i0 = _sample(layer, 7)
    torch.manual_seed(99)
    assert torch.equal(i0, _sample(layer, 7)) and not torch.equal(i0, _sample(layer, 8))
    # a whole forward: same seed, same output
    x = torch.randn(3, N_IN)
    with torch.no_grad():
        torch.manual_seed(1)
        y1 = q(x)
        torch.manual_seed(1)
        assert torch.equal(y1, q(x))


def test_each_weights_mean_and_variance_match_the_fp32_bnn_within_one_int8_step(qbnn):
    bnn, q = qbnn
    layer, fp = quant_layers(q)[0], bnn[0]
    s = layer.weight_scale().double().view(-1, 1)
    mu, sigma = fp.mu_weight.detach().double(), fp.sigma_weight.detach().double()
    # exact law of each int8 sample: the kernel's integers over the 511 grid values with their probabilities
    mu16, sg16 = layer.operands()
    z = torch.arange(-255, 256, dtype=torch.int64)
    p = noise.grid_probabilities()
    w = (
        mu16.long()[..., None] * 2**noise.MU16_SHIFT + sg16.long()[..., None] * z + 2 ** (noise.SHIFT16 - 1)
    ) >> (noise.SHIFT16)
    w = w.clamp(-127, 127).double() * s[..., None]
    mean, var = (w * p).sum(-1), (w * w * p).sum(-1) - (w * p).sum(-1) ** 2
    assert float(((mean - mu).abs() / s).max()) <= 1.0
    assert float(((var.sqrt() - sigma).abs() / s).max()) <= 1.0
    assert float(sigma.div(s).mean()) > 5  # the noise is really there (many steps of it)
    # and the kernel's samples follow that law: 256 MC indices, per-weight z-scores of the empirical mean
    samples = torch.stack([_sample(layer, i).double() * s for i in range(256)])
    zscore = (samples.mean(0) - mean) / (var.sqrt() / 16).clamp_min(1e-9)
    assert float(zscore.abs().max()) < 6 and abs(float(zscore.mean())) < 0.05
    ratio = samples.var(0).mean() / var.mean()
    assert abs(float(ratio) - 1) < 0.02


def test_bank_entry_k_is_the_counter_sample_of_mc_index_k():
    torch.manual_seed(0)
    bnn = dnn_to_bnn(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)), moped_delta=0.3).eval()
    prep = calibrate(prepare(bnn), [torch.randn(8, 16)], mc_samples=1)
    bank, fresh = convert(prep, sampler="bank", bank_size=3, seed=2), convert(prep, sampler="fresh", seed=2,
                                                                               fresh_kernel="prepack")  # fmt: skip
    for lb, lf in zip(quant_layers(bank), quant_layers(fresh), strict=True):
        for k in range(3):
            assert torch.equal(lb.bank_weight(k)[0], lf.make_sample(*lf.draw(None, k))[0])


def _old_pool_sample(mu, sigma, scale, seed, stream, slot, negate, slots=16):
    """The pool noise of qbdl before the counter noise (copied from that noise.py): whole pool, then a window."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 104_729 * (int(stream) + 1)) % (2**63 - 1))
    n = mu.numel()
    pool = torch.empty(slots * n, dtype=torch.int16)
    for k in range(slots):
        zz = torch.randn(n, generator=gen).clamp_(-4.0, 4.0)
        pool[k * n : (k + 1) * n] = zz.mul_(64).round_().to(torch.int16)
    s = scale.view(-1, *[1] * (mu.dim() - 1)).double()
    mu32 = ((mu.double() / s * 2**18).round() + 2**17).to(torch.int32)
    sg32 = (sigma.double() / s * 2**12).round().to(torch.int32)
    x = torch.mul(sg32, pool[slot * n : (slot + 1) * n].view(mu.shape))
    x = torch.sub(mu32, x) if negate else x.add_(mu32)
    return x.bitwise_right_shift_(18).clamp_(-127, 127).to(torch.int8)


def test_an_older_files_bank_keeps_its_pool_samples_and_fresh_layers_warn():
    torch.manual_seed(0)
    bnn = dnn_to_bnn(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)), moped_delta=0.3).eval()
    prep = calibrate(prepare(bnn), [torch.randn(8, 16)], mc_samples=1)
    q = convert(prep, sampler="bank", bank_size=3, seed=2)
    from qbdl.quant.layers import QuantLayer

    for m in quant_layers(q):
        cfg = {**m.spec(), "noise_slots": 16}  # as an older file stored it
        old = QuantLayer(cfg, m.mu_q, m.mu_scale, m.sigma_q, m.sigma_scale, m.bias_q, m.bias_sigma_q)
        old.in_zp = m.in_zp
        assert old.noise == "pool" and old.spec()["noise_slots"] == 16
        gen = old.bank_generator()
        for k in range(3):
            negate = bool(torch.randint(0, 2, (1,), generator=gen))
            if old.bias_q is not None:
                torch.randn(old.bias_q.shape, generator=gen)
            mu, sig = noise.dequantize(old.mu_q, old.mu_scale), noise.dequantize(old.sigma_q, old.sigma_scale)
            want = _old_pool_sample(mu, sig, old.weight_scale(), 2, old.index, k, negate)
            assert torch.equal(old.bank_weight(k)[0], want)
        with pytest.warns(RuntimeWarning, match="MC samples"):
            fresh = QuantLayer({**cfg, "sampler": "fresh"}, m.mu_q, m.mu_scale, m.sigma_q, m.sigma_scale)
        assert fresh.noise == "counter" and "noise_slots" not in fresh.spec()
