"""Bayesian core: layers, dnn_to_bnn (MOPED), KL, ELBO, sampling, MC prediction."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qbdl.bayes import (
    BayesianConv2d,
    BayesianLinear,
    dnn_to_bnn,
    elbo_loss,
    kl_divergence,
    mc_predict,
    sampling,
)
from qbdl.models import resnet18, resnet20, resnet50


def _bnn_outputs_equal_dnn(dnn: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    dnn.eval()
    bnn = dnn_to_bnn(dnn, prior="moped", **kw).eval()
    with torch.no_grad(), sampling(bnn, "mean"):
        torch.testing.assert_close(bnn(x), dnn(x), rtol=0, atol=0)
    return bnn


@pytest.mark.parametrize("builder,size", [(resnet20, 32), (resnet18, 64), (resnet50, 64)])
def test_moped_mean_mode_equals_dnn(builder, size):
    torch.manual_seed(0)
    dnn = builder(num_classes=7)
    for m in dnn.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    bnn = _bnn_outputs_equal_dnn(dnn, torch.randn(2, 3, size, size))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in dnn.modules())
    n_bconv = sum(isinstance(m, BayesianConv2d) for m in bnn.modules())
    assert n_conv == n_bconv and n_conv > 0
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in bnn.modules())
    # input model untouched
    assert any(type(m) is nn.Conv2d for m in dnn.modules())


def test_moped_posterior_and_prior_init():
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        lin.weight[0, 0] = 0.0
    bnn = dnn_to_bnn(nn.Sequential(lin), prior_sigma=0.3, moped_delta=0.1, sigma_floor=1e-5)
    b = bnn[0]
    torch.testing.assert_close(b.prior_mu_weight, lin.weight.detach())
    torch.testing.assert_close(b.prior_sigma_weight, torch.full_like(lin.weight, 0.3))
    expected = torch.clamp(0.1 * lin.weight.detach().abs(), min=1e-5)
    torch.testing.assert_close(b.sigma_weight, expected, rtol=1e-4, atol=1e-7)
    assert b.sigma_weight[0, 0] > 0  # floored, never 0


def test_normal_prior():
    bnn = dnn_to_bnn(nn.Sequential(nn.Linear(4, 2)), prior="normal", prior_sigma=0.5, posterior_rho_init=-4.0)
    b = bnn[0]
    assert torch.all(b.prior_mu_weight == 0) and torch.all(b.prior_sigma_weight == 0.5)
    torch.testing.assert_close(b.sigma_weight, F.softplus(torch.full((2, 4), -4.0)))


def test_sampled_passes_differ_seed_reproduces_and_gradients_flow():
    torch.manual_seed(0)
    bnn = dnn_to_bnn(resnet20(num_classes=4, in_chans=1), moped_delta=0.2)
    x = torch.randn(3, 1, 16, 16)
    p1 = mc_predict(bnn, x, samples=2, seed=7)
    p2 = mc_predict(bnn, x, samples=2, seed=7)
    assert p1.shape == (2, 3, 4)
    assert torch.equal(p1, p2)
    assert not torch.allclose(p1[0], p1[1])
    assert not torch.allclose(p1, mc_predict(bnn, x, samples=2, seed=8))
    bnn.train()
    out = bnn(x)
    loss = elbo_loss(out, torch.tensor([0, 1, 2]), bnn, n_train=100)
    loss.backward()
    conv = bnn.conv1
    assert conv.mu_weight.grad is not None and conv.mu_weight.grad.abs().sum() > 0
    assert conv.rho_weight.grad is not None and conv.rho_weight.grad.abs().sum() > 0


def test_kl_matches_monte_carlo_and_is_zero_at_prior():
    torch.manual_seed(0)
    layer = BayesianLinear(3, 2)
    with torch.no_grad():
        layer.prior_mu_weight.normal_(0, 0.5)
        layer.prior_sigma_weight.uniform_(0.2, 1.0)
        layer.prior_mu_bias.normal_(0, 0.5)
        layer.prior_sigma_bias.uniform_(0.2, 1.0)
        layer.rho_weight.uniform_(-2, 0)
        layer.rho_bias.uniform_(-2, 0)
    n = 200_000
    mu = torch.cat([layer.mu_weight.flatten(), layer.mu_bias]).detach()
    sig = torch.cat([layer.sigma_weight.flatten(), layer.sigma_bias]).detach()
    pmu = torch.cat([layer.prior_mu_weight.flatten(), layer.prior_mu_bias])
    psig = torch.cat([layer.prior_sigma_weight.flatten(), layer.prior_sigma_bias])
    w = mu + sig * torch.randn(n, mu.numel())
    q, p = torch.distributions.Normal(mu, sig), torch.distributions.Normal(pmu, psig)
    mc = (q.log_prob(w) - p.log_prob(w)).sum(1)
    exact = layer.kl().item()
    assert abs(mc.mean().item() - exact) < 4 * mc.std().item() / n**0.5 + 1e-3
    # and against torch.distributions' closed form
    assert abs(torch.distributions.kl_divergence(q, p).sum().item() - exact) < 1e-4
    # posterior == prior -> exactly 0
    layer.set_prior(
        layer.mu_weight.detach(),
        layer.sigma_weight.detach(),
        layer.mu_bias.detach(),
        layer.sigma_bias.detach(),
    )
    assert kl_divergence(nn.Sequential(layer)).item() == pytest.approx(0.0, abs=1e-6)


def test_flipout_per_example_and_variance_matches_reparameterization():
    torch.manual_seed(0)
    conv_det = nn.Conv2d(4, 6, 3, padding=1)
    b_rep = dnn_to_bnn(nn.Sequential(conv_det), moped_delta=0.5)[0]
    b_flip = dnn_to_bnn(nn.Sequential(conv_det), moped_delta=0.5, estimator="flipout")[0]
    x = torch.randn(1, 4, 8, 8).expand(4, -1, -1, -1).contiguous()
    with torch.no_grad():
        y_flip = b_flip(x)
        assert not torch.allclose(y_flip[0], y_flip[1])  # identical inputs, different outputs
        # marginal distribution of one example's spatially pooled output over 1024 forward passes
        pooled_flip = torch.stack([b_flip(x).mean((2, 3))[1] for _ in range(1024)])
        pooled_rep = torch.stack([b_rep(x).mean((2, 3))[1] for _ in range(1024)])
    var_f, var_r = pooled_flip.var(0), pooled_rep.var(0)
    ratio = var_f / var_r
    # per-pixel signs shrink this ratio 9-27x; per-channel signs keep it at 1 (F(1023,1023) 99.9% ~ [0.81,1.23])
    assert torch.all((ratio > 0.78) & (ratio < 1.28)), ratio
    torch.testing.assert_close(
        pooled_flip.mean(0), pooled_rep.mean(0), atol=5 * var_r.sqrt().max().item() / 32, rtol=0
    )


def test_state_dict_round_trip_keeps_priors():
    torch.manual_seed(0)
    bnn = dnn_to_bnn(resnet20(num_classes=3, in_chans=1), prior_sigma=0.2)
    buf = io.BytesIO()
    torch.save(bnn.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert "conv1.prior_mu_weight" in state and "conv1.prior_sigma_weight" in state
    fresh = dnn_to_bnn(resnet20(num_classes=3, in_chans=1), prior_sigma=1.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(
        fresh.conv1.prior_sigma_weight, torch.full_like(fresh.conv1.prior_sigma_weight, 0.2)
    )
    torch.testing.assert_close(kl_divergence(fresh), kl_divergence(bnn))


class MyLinear(nn.Linear):
    pass


def test_conversion_bias_false_grouped_subclass_exclude():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, bias=False, padding=1, padding_mode="reflect"),
        nn.Conv2d(8, 8, 3, groups=4, stride=2, dilation=2, padding=2),
        nn.Flatten(),
        MyLinear(8 * 4 * 4, 5),
        nn.Linear(5, 2),
    ).eval()
    x = torch.randn(2, 4, 8, 8)
    bnn = _bnn_outputs_equal_dnn(model, x, exclude=("4",))
    assert isinstance(bnn[0], BayesianConv2d) and bnn[0].mu_bias is None
    assert bnn[1].groups == 4 and bnn[1].dilation == (2, 2)
    assert isinstance(bnn[3], BayesianLinear)
    assert type(bnn[4]) is nn.Linear
    with pytest.raises(ValueError, match="not modules"):
        dnn_to_bnn(model, exclude=("nope",))


def test_elbo_step_lowers_loss():
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    bnn = dnn_to_bnn(
        nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)), prior="normal", prior_sigma=1.0
    )
    opt = torch.optim.Adam(bnn.parameters(), lr=1e-2)

    def loss_at_seed():
        torch.manual_seed(123)
        return elbo_loss(bnn(x), y, bnn, n_train=64)

    before = loss_at_seed().item()
    for _ in range(20):
        opt.zero_grad()
        elbo_loss(bnn(x), y, bnn, n_train=64).backward()
        opt.step()
    assert loss_at_seed().item() < before - 0.1


def test_sigma_cache_follows_parameter_updates():
    layer = BayesianLinear(2, 2).eval()
    with torch.no_grad():
        s1 = layer.sigma_weight.clone()
        layer.rho_weight.add_(1.0)
        s2 = layer.sigma_weight
    torch.testing.assert_close(s2, F.softplus(layer.rho_weight.detach()))
    assert not torch.allclose(s1, s2)


def test_sampling_mode_switch_restores_and_rejects_unknown():
    bnn = dnn_to_bnn(nn.Sequential(nn.Linear(3, 2)), moped_delta=0.5)
    x = torch.randn(4, 3)
    with torch.no_grad(), sampling(bnn, "mean"):
        assert torch.equal(bnn(x), bnn(x))
    assert bnn[0].mode == "sample"
    with pytest.raises(ValueError, match="sampling mode"):
        with sampling(bnn, "median"):
            pass


def test_weight_bank_entries_are_posterior_samples_and_follow_mc_index():
    from qbdl.bayes import WeightBank

    torch.manual_seed(0)
    layer = nn.Linear(50, 40)
    bnn = dnn_to_bnn(nn.Sequential(layer), moped_delta=0.3)
    bank = WeightBank(bnn, size=3, seed=1)
    x = torch.randn(2, 50)
    p = mc_predict(bank, x, samples=4)
    torch.testing.assert_close(p[0], p[3])  # MC index 3 uses entry 3 mod 3 = 0
    assert not torch.allclose(p[0], p[1])
    w = bank.bank[1]["0.mu_weight"]
    z = (w - bnn[0].mu_weight) / bnn[0].sigma_weight  # standardised: ~N(0, 1)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.05
    with torch.no_grad():
        expected = torch.softmax(F.linear(x, w, bank.bank[1]["0.mu_bias"]), -1)
    torch.testing.assert_close(p[1], expected)
    assert bnn[0].mode == "sample"


def _copy_correlation(forward, x: torch.Tensor, n: int) -> torch.Tensor:
    """Per-output Pearson correlation, over n forwards, between the outputs of two copies of one input."""
    with torch.no_grad():
        ys = torch.stack([forward(x) for _ in range(n)]).double()  # [n, 2, K]
    a, b = ys[:, 0] - ys[:, 0].mean(0), ys[:, 1] - ys[:, 1].mean(0)
    return (a * b).mean(0) / (a.std(0, unbiased=False) * b.std(0, unbiased=False))


def test_flipout_bias_noise_is_per_example():
    # bias noise dominant: shared by the batch it correlates two copies of one input almost fully
    torch.manual_seed(0)
    layer = dnn_to_bnn(nn.Sequential(nn.Linear(6, 8)), moped_delta=0.05, estimator="flipout")[0]
    layer.set_posterior(layer.mu_weight, layer.sigma_weight, layer.mu_bias, torch.full((8,), 0.5))
    x = torch.randn(1, 6).repeat(2, 1)
    n = 2000
    r = _copy_correlation(layer, x, n)
    # iid: each r ~ N(0, 1/n); 8 outputs, |r| < 4.5 / sqrt(n) fails with probability < 1e-4
    assert r.abs().max() < 4.5 / n**0.5, r
    with torch.no_grad():
        sd = torch.stack([layer(x)[0] for _ in range(n)]).std(0)
    # the bias noise is still there, at its full standard deviation (0.5, plus the small weight noise)
    assert torch.all((sd > 0.5 * 0.93) & (sd < 0.5 * 1.15)), sd


class SameConv(nn.Conv2d):
    """TensorFlow-style 'same' padding computed from the input size."""

    def forward(self, x):
        pad = max(
            (-(-x.shape[-1] // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - x.shape[-1], 0
        )
        return F.conv2d(F.pad(x, (pad // 2, pad - pad // 2) * 2), self.weight, self.bias, self.stride)


class StdConv(nn.Conv2d):
    """Weight standardisation."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


class ScaledLinear(nn.Linear):
    """A scaled weight."""

    def forward(self, x):
        return F.linear(x, self.weight * 0.5, self.bias)


@pytest.mark.parametrize(
    "layer", [SameConv(3, 4, 3, stride=2), StdConv(3, 4, 3, padding=1), ScaledLinear(3, 4)]
)
def test_subclasses_with_their_own_forward_are_refused_by_name(layer):
    from qbdl.quant import prepare

    net = nn.Sequential(nn.Identity(), layer)
    with pytest.raises(NotImplementedError, match=r"dnn_to_bnn: layer '1' is a \w+, an nn\.\w+ subclass"):
        dnn_to_bnn(net)
    # excluded, the network converts and keeps its function exactly; quantization refuses by name
    x = torch.randn(2, 3, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(2, 3)
    bnn = dnn_to_bnn(net, exclude=("1",)).eval()
    assert torch.equal(bnn(x), net(x))
    with pytest.raises(NotImplementedError, match=r"prepare: layer '1' is a"):
        prepare(bnn)
