"""qbdl.quant on a briefly trained resnet20 BNN (scikit-learn digits): PTQ accuracy, QAT, bit-width simulation."""

import pytest
import torch

from qbdl.bayes import BayesianLayer, elbo_loss, mc_predict, sampling
from qbdl.quant import convert, convert_qat, prepare_qat, quant_layers, quantize_bnn, simulate

S = 4  # MC samples
SEED = 7


@pytest.fixture(scope="module")
def digits(digits_nets):
    _, bnn, train, xte, yte = digits_nets
    return bnn, train, xte, yte


@pytest.mark.parametrize(
    "mode,observer", [("fresh", "minmax"), ("bank", "percentile"), ("flipout", "histogram")]
)
def test_qbnn_agrees_with_fp32_bnn(digits, mode, observer):
    bnn, train, xte, yte = digits
    # calibration on training data only
    q = quantize_bnn(bnn, train, calib_batches=4, mc_samples=2, mode=mode, observer=observer, seed=SEED)
    p_fp = mc_predict(bnn, xte, S, seed=SEED).mean(0)
    p_q = mc_predict(q, xte, S, seed=SEED).mean(0)
    acc_fp = (p_fp.argmax(1) == yte).float().mean().item()
    acc_q = (p_q.argmax(1) == yte).float().mean().item()
    agree = (p_fp.argmax(1) == p_q.argmax(1)).float().mean().item()
    assert acc_fp > 0.85, acc_fp  # the brief training worked
    assert agree >= 0.98, (agree, acc_fp, acc_q)
    assert abs(acc_q - acc_fp) <= 0.01 + 1e-9, (acc_fp, acc_q)


def test_qat_step_and_convert(digits):
    bnn, train, xte, yte = digits
    qat = prepare_qat(bnn, bits=8)
    qat.train()
    xb, yb = train[0]
    with torch.no_grad():
        qat(xb)  # initialise the activation ranges
    opt = torch.optim.Adam(qat.parameters(), lr=1e-4)
    for xb, yb in train[:2]:
        opt.zero_grad()
        loss = elbo_loss(qat(xb), yb, qat, 1437)
        loss.backward()
        layers = [m for m in qat.modules() if isinstance(m, BayesianLayer)]
        assert all(m.mu_weight.grad is not None and m.mu_weight.grad.abs().sum() > 0 for m in layers)
        assert all(m.rho_weight.grad is not None and m.rho_weight.grad.abs().sum() > 0 for m in layers)
        opt.step()
    assert torch.isfinite(loss)
    qat.eval()
    q = convert_qat(qat, mode="bank", bank_size=2)
    assert len(quant_layers(q)) == 22
    x = xte[:64]
    with torch.no_grad(), sampling(qat, "mean"), sampling(q, "mean"):
        ref, out = qat(x), q(x)
    assert (out - ref).norm() / ref.norm() < 0.05
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    q2 = convert(qat, mode="fresh")
    with torch.no_grad():
        assert torch.isfinite(q2(x)).all()


def test_simulate_bit_widths(digits):
    bnn, train, xte, _ = digits
    x = xte[:64]
    with torch.no_grad(), sampling(bnn, "mean"):
        ref = bnn(x)
    err = {}
    for bits in (8, 6, 4):
        sim = simulate(bnn, bits=bits, batches=train, calib_batches=2, mc_samples=1)
        with torch.no_grad(), sampling(sim, "mean"):
            err[bits] = ((sim(x) - ref).norm() / ref.norm()).item()
        with torch.no_grad():
            assert torch.isfinite(sim(x)).all()  # sample mode runs too
    assert err[4] >= err[8], err
    assert err[8] < 0.05, err
