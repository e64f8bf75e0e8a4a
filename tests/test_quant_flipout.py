"""Per-example INT8 Flipout (sampler='flipout'): its elementwise kernels, per-example samples, its law."""

import pytest
import torch
from helpers_run import compose_config
from torch import nn

from qbdl.bayes import dnn_to_bnn, mc_predict, set_mc_index
from qbdl.models import resnet20
from qbdl.pipeline.run import run
from qbdl.quant import calibrate, convert, load_qbnn, native, prepare, quant_layers, save_qbnn

SIZE = 16


@pytest.fixture(scope="module")
def bnn():
    torch.manual_seed(0)
    return dnn_to_bnn(
        resnet20(num_classes=10, in_chans=3).eval(), moped_delta=0.1, estimator="flipout"
    ).eval()


@pytest.fixture(scope="module")
def prepared(bnn):
    calib = [torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    return calibrate(prepare(bnn, per_example=True), calib, mc_samples=2, seed=0)


@pytest.fixture(scope="module")
def qflip(prepared):
    return convert(prepared, sampler="flipout", bank_size=4, seed=3)


def _x(n=4, seed=5):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _signs(n, c, seed):
    return (torch.randint(0, 2, (n, c), generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(torch.int8)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 70)])
def test_flip_requant_and_signed_add_equal_their_float_formulas(shape):
    assert native.available()
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    a = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).contiguous(memory_format=fmt)
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).contiguous(memory_format=fmt)
    s = _signs(shape[0], shape[1], 1)
    sv = s.view(*s.shape, *[1] * (len(shape) - 2)).float()
    got = torch.ops.qbdl.flip_requant(a, s, 10, 0.5, 128)
    want = (torch.round(sv * (a.float() - 10) * 0.5) + 128).clamp(0, 255)
    assert torch.equal(got.float(), want)
    for relu in (False, True):
        got = torch.ops.qbdl.signed_add(a, 0.03, 7, b, 0.01, 128, s, 0.05, 20, relu)
        real = 0.03 * (a.float() - 7) + sv * 0.01 * (b.float() - 128)
        want = (torch.round(real / 0.05) + 20).clamp(20 if relu else 0, 255)
        # float32 in C++ vs torch: the quotient may land on the other side of a .5 tie
        assert (got.float() - want).abs().max() <= 1 and (got.float() != want).float().mean() < 0.01


def test_elementwise_kernels_reject_channels_first():
    x = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)  # NCHW: channels are not innermost
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.qbdl.flip_requant(x, _signs(2, 3, 0), 0, 0.5, 128)


def test_each_example_gets_its_own_weight_sample(prepared, qflip):
    x = _x(1).repeat(6, 1, 1, 1)  # six copies of one image
    fresh = convert(prepared, sampler="fresh", seed=3)
    with torch.no_grad():
        set_mc_index(qflip, 0)  # one bank entry: only the Flipout signs differ between examples
        y = qflip(x)
        set_mc_index(qflip, None)
        yf = fresh(x)
    assert all(not torch.equal(y[0], y[i]) for i in range(1, 6))
    assert all(torch.equal(yf[0], yf[i]) for i in range(1, 6))  # fresh: one sample per pass


def test_flipout_seed_reproduces_and_passes_differ(qflip, tmp_path):
    x = _x()
    with torch.no_grad():
        torch.manual_seed(4)
        a = qflip(x)
        torch.manual_seed(4)
        b = qflip(x)
        c = qflip(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    save_qbnn(qflip, tmp_path / "f.qbdl")
    loaded = load_qbnn(tmp_path / "f.qbdl")
    assert all(m.sampler == "flipout" for m in quant_layers(loaded))
    with torch.no_grad():
        torch.manual_seed(4)
        d = loaded(x)
    assert torch.equal(a, d)


def test_flipout_matches_fp32_flipout_in_distribution(bnn, qflip):
    """Over 256 passes: predictive mean and per-logit spread of INT8 Flipout match the FP32 BNN's."""
    x = _x(2, seed=9)
    with torch.no_grad():
        lq = mc_predict(qflip, x, 256, seed=0)
        lf = mc_predict(bnn, x, 256, seed=0)
    scale = lf.mean(0).abs().max()
    assert (lq.mean(0) - lf.mean(0)).abs().max() < 0.05 * scale
    ratio = lq.std(0).pow(2).mean().sqrt() / lf.std(0).pow(2).mean().sqrt()
    assert 0.7 < ratio < 1.3, ratio


def test_flipout_needs_its_calibration_and_a_onednn_backend(bnn):
    calib = [torch.randn(4, 3, SIZE, SIZE)]
    plain = calibrate(prepare(bnn), calib, mc_samples=1)
    with pytest.raises(ValueError, match="per_example=True"):
        convert(plain, sampler="flipout")


def test_qat_model_does_not_convert_to_flipout(bnn):
    from qbdl.quant import convert_qat, prepare_qat

    with pytest.raises(ValueError, match="post-training mode"):
        convert_qat(prepare_qat(bnn), sampler="flipout")


def test_flipout_on_a_linear_net(tmp_path):
    torch.manual_seed(0)
    b = dnn_to_bnn(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), moped_delta=0.2).eval()
    prep = calibrate(prepare(b, per_example=True), [torch.randn(16, 20)], mc_samples=2)
    q = convert(prep, sampler="flipout", bank_size=2)
    x = torch.randn(1, 20).repeat(4, 1)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (4, 5) and not torch.equal(y[0], y[1])


def test_pipeline_runs_with_quant_flipout(tmp_path):
    results = run(compose_config(tmp_path, ["quant=flipout"]))
    q = results["variants"]["qbnn"]
    assert 0 <= q["accuracy"] <= 1 and q["mi_mean"] > 0
    assert results["config"]["quant"]["sampler"] == "flipout"


def test_int8_flipout_bias_noise_is_per_example():
    # a linear net whose output noise is mostly bias noise: shared by the batch, two copies of one input
    # would be correlated almost fully (the FP32 twin of this test is in test_bayes.py)
    torch.manual_seed(0)
    b = dnn_to_bnn(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 6)), moped_delta=0.05).eval()
    last = b[2]
    last.estimator = "flipout"
    last.set_posterior(last.mu_weight, last.sigma_weight, last.mu_bias, torch.full((6,), 0.3))
    prep = calibrate(prepare(b, per_example=True), [torch.randn(64, 12)], mc_samples=4)
    q = convert(prep, sampler="flipout", bank_size=64, seed=1)
    x = torch.randn(1, 12).repeat(2, 1)
    n = 1500
    with torch.no_grad():
        ys = torch.stack([q(x) for _ in range(n)]).double()
    a, c = ys[:, 0] - ys[:, 0].mean(0), ys[:, 1] - ys[:, 1].mean(0)
    r = (a * c).mean(0) / (a.std(0, unbiased=False) * c.std(0, unbiased=False))
    # iid: r ~ N(0, 1/n) per output; |r| < 4.5 / sqrt(n) fails with probability < 1e-4 for 6 outputs
    assert r.abs().max() < 4.5 / n**0.5, r
    assert torch.all(ys[:, 0].std(0) > 0.2)  # the bias noise is there (sd 0.3 plus weight noise)
