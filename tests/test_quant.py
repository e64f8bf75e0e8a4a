"""qbdl.quant: BN folding, INT8 Bayesian layers, fresh/bank sampling, save/load, backends, errors."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qbdl.bayes import BayesianConv2d, dnn_to_bnn, mc_predict, sampling, set_mc_index
from qbdl.models import resnet20, resnet50
from qbdl.quant import (
    PreparedLayer,
    QuantLayer,
    calibrate,
    convert,
    fold_bn,
    load_qbnn,
    prepare,
    quant_layers,
    quantize_bnn,
    save_qbnn,
    supported_backends,
)

SIZE = 16


def _perturb_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


@pytest.fixture(scope="module")
def bnn():
    torch.manual_seed(0)
    dnn = _perturb_bn(resnet20(num_classes=10, in_chans=3)).eval()
    return dnn_to_bnn(dnn, moped_delta=0.05, prior_sigma=0.1).eval()


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, SIZE, SIZE, generator=g), torch.zeros(8)) for _ in range(2)]


@pytest.fixture(scope="module")
def prepared(bnn, calib):
    return calibrate(prepare(bnn), calib, mc_samples=2, seed=0)


@pytest.fixture(scope="module")
def qbnn(prepared):
    return convert(prepared, sampler="fresh", seed=3)


@pytest.fixture(scope="module")
def qbank(prepared):
    return convert(prepared, sampler="bank", bank_size=4, seed=3)


def _x(n=4, seed=5):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_fold_bn_exact_bayesian_conv():
    torch.manual_seed(0)
    conv = BayesianConv2d(4, 6, 3, padding=1, bias=False)
    conv.rho_weight.data.uniform_(-5, -2)
    bn = _perturb_bn(nn.Sequential(nn.BatchNorm2d(6)))[0].eval()
    bn.weight.data[0] = -0.7  # negative gamma: sigma must scale by |s|
    folded, det_bias = fold_bn(conv, bn)
    x = torch.randn(2, 4, 8, 8)
    conv.mode = folded.mode = "mean"
    with torch.no_grad():
        ref = bn(conv(x))
        out = folded(x) + det_bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
    torch.testing.assert_close(folded.sigma_weight, s.abs() * conv.sigma_weight, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(folded.mu_weight, s * conv.mu_weight)
    # the KL is invariant under the joint scaling of posterior and prior
    torch.testing.assert_close(folded.kl(), conv.kl(), rtol=1e-4, atol=1e-3)


def test_fold_bn_bayesian_bias():
    torch.manual_seed(1)
    conv = BayesianConv2d(3, 5, 3, bias=True)
    bn = _perturb_bn(nn.Sequential(nn.BatchNorm2d(5)), 2)[0].eval()
    folded, det_bias = fold_bn(conv, bn)
    assert det_bias is None
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    torch.testing.assert_close(folded.sigma_bias, s.abs() * conv.sigma_bias, rtol=1e-5, atol=1e-9)
    conv.mode = folded.mode = "mean"
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_prepared_mean_mode_equals_bnn(bnn, prepared):
    x = _x()
    with torch.no_grad(), sampling(bnn, "mean"), sampling(prepared, "mean"):
        torch.testing.assert_close(prepared(x), bnn(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert sum(isinstance(m, PreparedLayer) and m.relu for m in prepared.modules()) >= 10


def test_qbnn_holds_int8_and_runs_quantized_kernels(qbnn):
    layers = quant_layers(qbnn)
    assert len(layers) == 22 and all(m.bayesian for m in layers)
    for m in layers:
        assert m.mu_q.dtype == torch.int8 and m.sigma_q.dtype == torch.int8
        assert m.bias_q is None or m.bias_q.dtype == torch.int32
        assert not any(
            p.is_floating_point() and p.numel() == m.mu_q.numel() for p in m.buffers() if p is not m.mu_q
        )
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((i[0], o))) for m in layers]
    with torch.no_grad():
        out = qbnn(_x())
    for h in hooks:
        h.remove()
    assert out.dtype == torch.float32 and out.shape == (4, 10)
    assert len(seen) == len(layers)
    # plain integer tensors between the layers: no quantized dtype anywhere
    assert all(i.dtype == torch.uint8 and o.dtype == torch.uint8 for i, o in seen)
    assert not any(t.is_quantized for t in (*qbnn.buffers(), *qbnn.parameters()))
    assert layers[3].sampled_int8_weight().dtype == torch.int8


def test_fresh_passes_differ_and_seed_reproduces(qbnn):
    x = _x()
    with torch.no_grad():
        a, b = qbnn(x), qbnn(x)
        assert not torch.equal(a, b)
        torch.manual_seed(11)
        c = qbnn(x)
        torch.manual_seed(11)
        d = qbnn(x)
        torch.testing.assert_close(c, d, rtol=0, atol=0)
        p1, p2 = mc_predict(qbnn, x, 3, seed=4), mc_predict(qbnn, x, 3, seed=4)
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    assert not torch.equal(p1[0], p1[1])


def test_fresh_sequential_path_equals_prefetch(qbnn):
    from qbdl.quant.layers import enable_prefetch

    x = _x()
    with torch.no_grad():
        torch.manual_seed(2)
        a = qbnn(x)
        enable_prefetch(qbnn, 0)
        torch.manual_seed(2)
        b = qbnn(x)
        enable_prefetch(qbnn, 2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_sampled_int8_spread_matches_sigma(delta):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, bias=False)
    dnn = nn.Sequential(conv, nn.ReLU())
    b = dnn_to_bnn(dnn, moped_delta=delta)
    prep = calibrate(prepare(b), [torch.randn(4, 32, 6, 6)], mc_samples=1)
    layer = quant_layers(convert(prep, sampler="fresh", seed=0))[0]
    torch.manual_seed(123)
    step = layer.weight_scale().view(-1, 1, 1, 1)
    samples = torch.stack([layer.sampled_int8_weight().float() * step for _ in range(600)])
    sigma = b[0].sigma_weight.detach()
    mu = b[0].mu_weight.detach()
    emp_std = samples.std(0)
    ratio = emp_std.pow(2).mean().sqrt() / sigma.pow(2).mean().sqrt()
    assert abs(ratio - 1) < 0.05, ratio
    # weights whose sigma spans several int8 steps: per-weight spread within 5% on average
    step = layer.weight_scale().view(-1, 1, 1, 1).expand_as(sigma)
    big = sigma > 2 * step
    if big.sum() > 50:
        assert abs((emp_std[big] / sigma[big]).mean() - 1) < 0.05
    # centred on mu up to the int8 rounding of mu itself (|error| ~ 1/4 step on average)
    assert ((samples.mean(0) - mu).abs() / step).mean() < 0.35


def test_bank_reuses_entry_for_mc_index(qbank):
    x = _x()
    with torch.no_grad():
        set_mc_index(qbank, 1)
        a = qbank(x)
        set_mc_index(qbank, 5)  # 5 mod 4 == 1
        b = qbank(x)
        set_mc_index(qbank, 2)
        c = qbank(x)
        set_mc_index(qbank, None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    p = mc_predict(qbank, x, 5, seed=0)
    torch.testing.assert_close(p[0], p[4], rtol=0, atol=0)
    with torch.no_grad():
        torch.manual_seed(3)
        r1 = qbank(x)
        torch.manual_seed(3)
        r2 = qbank(x)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)


def test_mean_mode_deterministic_and_close_to_fp32(bnn, qbnn):
    x = _x(16)
    with torch.no_grad(), sampling(qbnn, "mean"), sampling(bnn, "mean"):
        a, b, ref = qbnn(x), qbnn(x), bnn(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    rel = (a - ref).norm() / ref.norm()
    assert rel < 0.1, rel


@pytest.mark.parametrize("sampler", ["fresh", "bank"])
def test_save_load_round_trip(prepared, bnn, tmp_path, sampler):
    q = convert(prepared, sampler=sampler, bank_size=3, seed=9)
    path = os.path.join(tmp_path, "q.safetensors")
    save_qbnn(q, path)
    with open(path, "rb") as f:
        assert f.read(2) != b"\x80\x02"  # not a pickle
    q2 = load_qbnn(path)
    x = _x()
    torch.testing.assert_close(mc_predict(q2, x, 4, seed=1), mc_predict(q, x, 4, seed=1), rtol=0, atol=0)
    with torch.no_grad(), sampling(q, "mean"), sampling(q2, "mean"):
        torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)
    if sampler == "fresh":
        fp32 = os.path.join(tmp_path, "bnn.pt")
        torch.save(bnn.state_dict(), fp32)
        ratio = os.path.getsize(path) / os.path.getsize(fp32)
        assert ratio <= 0.27, ratio


def test_qdnn_plain_network(calib):
    torch.manual_seed(0)
    dnn = _perturb_bn(resnet20(num_classes=10)).eval()
    q = quantize_bnn(dnn, calib, calib_batches=1)
    assert type(q).__name__ == "QDNN"
    assert not any(hasattr(m, "mode") for m in quant_layers(q))
    x = _x(16)
    with torch.no_grad():
        ref, out = dnn(x), q(x)
        torch.testing.assert_close(q(x), out, rtol=0, atol=0)
    assert (out - ref).norm() / ref.norm() < 0.1
    assert dnn.conv1.weight.dtype == torch.float32  # input untouched


def test_sequential_net_without_stubs_and_flipout(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    _perturb_bn(net)
    b = dnn_to_bnn(net, estimator="flipout").eval()
    calib = [torch.randn(4, 2, 10, 10) for _ in range(2)]
    q = quantize_bnn(b, calib, sampler="fresh")
    x = torch.randn(3, 2, 10, 10)
    with torch.no_grad(), sampling(q, "mean"), sampling(b, "mean"):
        out, ref = q(x), b(x)
    assert out.shape == (3, 3) and (out - ref).norm() / ref.norm() < 0.15
    path = os.path.join(tmp_path, "s.safetensors")
    save_qbnn(q, path)
    torch.testing.assert_close(mc_predict(load_qbnn(path), x, 2, seed=0), mc_predict(q, x, 2, seed=0))


def test_input_model_untouched(bnn, calib):
    before = {k: v.clone() for k, v in bnn.state_dict().items()}
    quantize_bnn(bnn, calib, calib_batches=1, mc_samples=1, sampler="bank", bank_size=2)
    after = bnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in bnn.modules())


def test_onednn_is_the_x86_backend_by_another_name(bnn, calib):
    if "onednn" not in supported_backends():
        pytest.skip("no oneDNN INT8 ops in this torch build")
    x = _x(8)
    q1, q2 = (quantize_bnn(bnn, calib, backend=b, calib_batches=1, mc_samples=1) for b in ("onednn", "x86"))
    with torch.no_grad(), sampling(q1, "mean"), sampling(q2, "mean"), sampling(bnn, "mean"):
        out, same, ref = q1(x), q2(x), bnn(x)
    assert torch.equal(out, same)
    assert (out - ref).norm() / ref.norm() < 0.15


def test_errors(bnn, calib):
    with pytest.raises(ValueError, match="calibration set is empty"):
        calibrate(prepare(bnn), [])
    with pytest.raises(ValueError, match="calibration set is empty"):
        quantize_bnn(bnn, calib, calib_batches=0)
    with pytest.raises(ValueError, match="unknown quantized backend"):
        prepare(bnn, backend="tpu9000")
    with pytest.raises(ValueError, match="unknown quantized backend"):
        quantize_bnn(bnn, calib, backend="nope")
    with pytest.raises(ValueError):
        convert(prepare(bnn), sampler="sometimes")


def test_resnet50_conversion_smoke():
    torch.manual_seed(0)
    b = dnn_to_bnn(resnet50(num_classes=5).eval()).eval()
    q = quantize_bnn(b, [torch.randn(1, 3, 32, 32)], mc_samples=1, sampler="bank", bank_size=1)
    assert len(quant_layers(q)) == 54
    with torch.no_grad():
        out = q(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert isinstance(quant_layers(q)[0], QuantLayer)
    assert F.softmax(out, -1).sum(-1).allclose(torch.ones(2))
