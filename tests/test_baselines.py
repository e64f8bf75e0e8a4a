"""Baselines (issue 33): deep ensemble, MC dropout (FP32 and integer), last-layer Laplace against laplace-torch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qbdl import metrics, quant
from qbdl.baselines import Ensemble, MCDropout, QDropout, add_mc_dropout, fit_last_layer_laplace, int8_dropout
from qbdl.baselines.laplace import LastLayerLaplace, features, probit_nll
from qbdl.baselines.mcdropout import for_ptq, to_int8_dropout
from qbdl.bayes import mc_logits
from qbdl.experiment.memory import resident_bytes
from qbdl.models import resnet20


def _const(logits: list[float]) -> nn.Module:
    """A net whose logits are `logits` for every input (a bias-only linear layer)."""
    lin = nn.Linear(1, len(logits))
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor(logits))
    return lin


# ---------------------------------------------------------------- deep ensemble


def test_ensemble_mc_passes_are_the_members_and_average_hand_computed():
    # member A: softmax([0, log 3]) = [1/4, 3/4]; member B: [3/4, 1/4]; the ensemble's mean is [1/2, 1/2]
    e = Ensemble([_const([0.0, math.log(3)]), _const([math.log(3), 0.0])])
    x = torch.zeros(5, 1)
    p = torch.softmax(mc_logits(e, x, 2, seed=0), -1)
    assert torch.allclose(p[0], torch.tensor([0.25, 0.75]).expand(5, 2), atol=1e-6)
    assert torch.allclose(p[1], torch.tensor([0.75, 0.25]).expand(5, 2), atol=1e-6)
    assert torch.allclose(p.mean(0), torch.full((5, 2), 0.5), atol=1e-6)
    h_member = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623
    assert torch.allclose(metrics.predictive_entropy(p), torch.full((5,), math.log(2)), atol=1e-6)
    assert torch.allclose(metrics.mutual_information(p), torch.full((5,), math.log(2) - h_member), atol=1e-6)
    assert e.index is None  # mc_logits resets the index: a plain call runs member 0
    assert torch.allclose(torch.softmax(e(x), -1)[0], torch.tensor([0.25, 0.75]), atol=1e-6)


def test_ensemble_refuses_more_passes_than_members():
    e = Ensemble([_const([0.0, 1.0])])
    with pytest.raises(ValueError, match="ensemble has 1 members"):
        mc_logits(e, torch.zeros(2, 1), 2)
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])


# ---------------------------------------------------------------- MC dropout


def test_mc_dropout_is_torchs_dropout_kept_on_in_eval():
    x = torch.randn(3, 7, 5)
    d = MCDropout(0.3).eval()
    torch.manual_seed(11)
    ours = d(x)
    torch.manual_seed(11)
    ref = F.dropout(x, 0.3, training=True)  # torch's own dropout, same RNG stream
    assert torch.equal(ours, ref)
    kept = ours != 0
    assert torch.allclose(ours[kept], x[kept] / 0.7)
    assert 0 < kept.float().mean() < 1


def test_int8_dropout_hand_computed():
    q = torch.tensor([0, 10, 11, 15, 19, 55, 127, 200], dtype=torch.uint8)
    keep = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    # z = 10, p = 0.1: z + round((q - z) / 0.9), clamped to 0..127; dropped -> z
    # q - z = -10 -> -11.11 -> -11 -> -1 -> 0; 0 -> 10; 1 -> 1.11 -> 11; 5 -> 5.56 -> 16; 9 -> 10 -> 20;
    # 45 -> 50 -> 60; 117 -> 130 -> 140 -> 127 (saturates); 190 -> dropped -> 10
    out = int8_dropout(q, 0.1, zero_point=10, qmax=127, keep=keep)
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 10, 11, 16, 20, 60, 127, 10]
    # p = 0.5, full range: kept values doubled around z, ties to even never arise
    out = int8_dropout(q, 0.5, zero_point=10, qmax=255, keep=torch.ones(8, dtype=torch.bool))
    assert out.tolist() == [0, 10, 12, 20, 28, 100, 244, 255]


@pytest.mark.parametrize("p,zp", [(0.1, 0), (0.25, 7)])
def test_int8_dropout_matches_fp32_dropout_on_dequantized_values(p, zp):
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 128, (4, 16, 6, 6), dtype=torch.uint8, generator=g)
    scale, qmax = 0.037, 127
    r = (q.float() - zp) * scale
    torch.manual_seed(5)
    ref = MCDropout(p)(r)  # FP32 dropout on the dequantized activation
    torch.manual_seed(5)
    out = QDropout(p, scale, zp, qmax)(q)
    deq = (out.float() - zp) * scale
    assert torch.equal(ref == 0, (out.int() == zp) & (r != 0) | (r == 0))  # the same positions dropped
    level = ref / scale + zp
    inside = (level >= 0) & (level <= qmax)  # the rescaled value stays on the calibrated range
    assert inside.float().mean() > 0.8
    assert (deq - ref)[inside].abs().max() <= scale / 2 + 1e-6  # within half a step of FP32
    assert torch.all(out[level > qmax] == qmax) and torch.all(out[level < 0] == 0)  # beyond it: saturates


def test_mc_dropout_placement_and_int8_graph():
    torch.manual_seed(0)
    net = add_mc_dropout(resnet20(10, 1), 0.2, ["blocks", "head"]).eval()
    fp = [m for m in net.modules() if isinstance(m, MCDropout)]
    assert len(fp) == 9 + 1  # ResNet-20: 9 residual blocks, then the head
    assert isinstance(net.fc[0], MCDropout) and isinstance(net.fc[1], nn.Linear)
    with pytest.raises(ValueError, match="placement"):
        add_mc_dropout(resnet20(10, 1), 0.1, ["everywhere"])
    calib = [torch.randn(16, 1, 16, 16) for _ in range(2)]
    q = to_int8_dropout(quant.quantize_bnn(for_ptq(copy.deepcopy(net)), calib, observer="minmax"))
    qd = {n: m for n, m in q.named_modules() if isinstance(m, QDropout)}
    assert len(qd) == 10 and all(m.p == 0.2 for m in qd.values())
    # each reads the grid of the INT8 op that made its input: a block's output is its residual add's
    add = {(m.scale, m.zero_point) for m in q.modules() if isinstance(m, quant.QAdd)}
    assert {(m.scale, m.zero_point) for n, m in qd.items() if n != "fc.0"} <= add
    x = torch.randn(8, 1, 16, 16)
    a, b = mc_logits(q, x, 2, seed=1), mc_logits(q, x, 2, seed=1)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])  # seeded, and the passes differ


# ---------------------------------------------------------------- last-layer Laplace


@pytest.fixture(scope="module")
def small_net():
    """A 5-8-3 MLP fitted on 200 seeded points, with its loader and test inputs."""
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.Adam(net.parameters(), 0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    return net, loader, torch.randn(7, 5)


@pytest.mark.parametrize("hessian,structure", [("full", "full"), ("kron", "kron")])
def test_last_layer_laplace_matches_laplace_torch(small_net, hessian, structure):
    laplace = pytest.importorskip("laplace")
    net, loader, xt = small_net
    la = laplace.Laplace(
        net,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure=structure,
        prior_precision=0.7,
    )
    la.fit(loader)
    with torch.no_grad():
        f_mu, f_var = la._glm_predictive_distribution(xt)
        p_ref = la(xt, pred_type="glm", link_approx="probit")
    ours = fit_last_layer_laplace(net[:2], net[2], loader, loader, [0.7], hessian, "probit")
    with torch.no_grad():
        mu, cov = ours.logit_distribution(net[:2](xt))
        p = torch.softmax(ours(xt), -1)
    assert torch.allclose(mu.float(), f_mu, atol=1e-5)
    assert torch.allclose(cov.float(), f_var, rtol=1e-4, atol=1e-5)
    assert torch.allclose(p, p_ref, atol=1e-5)


class _Counting(nn.Module):
    """A backbone that counts its forward calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.net(x)


def test_laplace_mc_samples_head_only_and_match_the_glm_predictive(small_net):
    net, loader, xt = small_net
    backbone = _Counting(net[:2])
    la = fit_last_layer_laplace(backbone, net[2], loader, loader, [0.05], "full", "mc")
    backbone.calls = 0
    logits = mc_logits(la, xt, 800, seed=2)
    assert backbone.calls == 1  # the backbone ran once for all 800 passes of the batch
    with torch.no_grad():
        mu, cov = la.logit_distribution(net[:2](xt))
    mean, centred = logits.double().mean(0), logits.double() - logits.double().mean(0)
    emp = torch.einsum("sbc,sbd->bcd", centred, centred) / (len(logits) - 1)
    se = torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1) / len(logits))
    assert torch.all((mean - mu).abs() <= 5 * se + 1e-6)
    assert torch.allclose(emp, cov, rtol=0.25, atol=0.05 * cov.abs().max().item())
    assert torch.equal(logits, mc_logits(la, xt, 800, seed=2))  # same seeds, same draws
    assert la._cache is None  # the features are released after the batch


def test_laplace_prior_precision_is_the_validation_argmin(small_net):
    net, loader, xt = small_net
    grid = [1e-3, 0.1, 10.0, 1e3]
    la = fit_last_layer_laplace(net[:2], net[2], loader, loader, grid, "full", "mc")
    scores = la.fit_report["val_probit_nll"]
    assert la.fit_report["at_grid_edge"] == (la.fit_report["prior_precision"] in (grid[0], grid[-1]))
    assert set(scores) == set(grid) and la.fit_report["prior_precision"] == min(scores, key=scores.get)
    assert float(la.prior_precision) == la.fit_report["prior_precision"]
    # the NLL the report gives is the probit NLL of that delta, recomputed from scratch
    phi, y = features(net[:2], loader)
    fresh = fit_last_layer_laplace(
        net[:2], net[2], (phi, y), (phi, y), [la.fit_report["prior_precision"]], "full"
    )
    assert probit_nll(fresh, phi, y) == pytest.approx(scores[la.fit_report["prior_precision"]], rel=1e-9)
    assert not any(k.startswith("ggn_") for k in la._buffers)  # only the posterior stays resident
    with pytest.raises(ValueError, match="positive"):
        fit_last_layer_laplace(net[:2], net[2], loader, loader, [0.0])
    with pytest.raises(ValueError, match="kron"):
        big = nn.Linear(200, 100)
        fit_last_layer_laplace(nn.Identity(), big, (torch.randn(4, 200), torch.zeros(4, dtype=torch.long)),
                               (torch.randn(4, 200), torch.zeros(4, dtype=torch.long)), [1.0], "full")  # fmt: skip


def test_resident_bytes_counts_each_storage_once():
    lin = nn.Linear(10, 4)  # 44 float32 values
    assert resident_bytes(lin) == 44 * 4
    e = Ensemble([lin, lin])  # the same member twice: one storage each
    assert resident_bytes(e) == 44 * 4
    w = torch.zeros(3, 5, dtype=torch.float64)  # [C, F + 1]
    la = LastLayerLaplace(nn.Identity(), w, {"H": torch.eye(15, dtype=torch.float64)}, 1.0, "full")
    # weight [3, 5] + H [15, 15] + prior precision + sigma [15, 15], float64
    assert resident_bytes(la) == 8 * (15 + 225 + 1 + 225)
