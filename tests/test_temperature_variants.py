"""Temperature-scaled variants in the evaluation: fitted on validation only, applied per MC sample."""

import pytest
import torch
from torch import nn

from qbdl import metrics
from qbdl.bayes import dnn_to_bnn, mc_logits
from qbdl.experiment.evaluate import Variant, evaluate_variants


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    dnn = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(dnn.parameters(), lr=0.05)
    for _ in range(60):  # overfit a little: over-confident logits, T > 1
        for x, y in _data(96, 1):
            opt.zero_grad()
            nn.functional.cross_entropy(dnn(x), y).backward()
            opt.step()
    return dnn.eval(), dnn_to_bnn(dnn, moped_delta=0.3).eval()


def test_ts_variants_fit_on_validation_and_scale_each_sample(nets):
    dnn, bnn = nets
    test, val, ood = _data(160, 2), _data(96, 3), _data(64, 4)
    ev = evaluate_variants(
        [Variant("dnn", dnn, 1, 0), Variant("bnn", bnn, 4, 0)],
        test,
        {"shifted": [(x * 3, y) for x, y in ood]},
        seed=7, target_accuracy=0.9, n_bins=10, score="entropy",
        temperature_scaled=["dnn", "bnn"], val_loader=val, ood_groups={"shifted": "far"},
    )  # fmt: skip
    res, pred = ev.metrics, ev.predictions
    assert list(res) == ["dnn", "dnn_ts", "bnn", "bnn_ts"]
    for name, v in (("dnn", dnn), ("bnn", bnn)):
        samples = 1 if name == "dnn" else 4
        val_logits = torch.cat([mc_logits(v, x, samples, seed=7) for x, _ in val], 1)
        t = metrics.fit_temperature(val_logits, torch.cat([y for _, y in val]))
        assert ev.temperatures[name] == pytest.approx(t, rel=1e-9)
        # test metrics of the scaled variant: softmax(logits_s / T) averaged over samples, never test-fitted
        test_logits = torch.cat([mc_logits(v, x, samples, seed=7) for x, _ in test], 1)
        y = torch.cat([y for _, y in test])
        want = metrics.summarize(torch.softmax(test_logits / t, -1), y, n_bins=10, target_accuracy=0.9)
        for k in ("accuracy", "nll", "ece", "uce", "augrc"):
            assert res[f"{name}_ts"][k] == pytest.approx(want[k], rel=1e-6, abs=1e-9)
        t_test = metrics.fit_temperature(test_logits, y)
        assert abs(t - t_test) > 1e-6  # (so the check above tells validation from test fitting)
    assert ev.temperatures["dnn"] > 1.0 and res["dnn_ts"]["nll"] < res["dnn"]["nll"]
    assert res["bnn_ts"]["ood"]["shifted"]["group"] == "far" and "far" in res["bnn_ts"]["ood_groups"]
    assert res["bnn_ts"]["ood_far_auroc"] == res["bnn_ts"]["ood_groups"]["far"]["entropy"]["auroc"]
    assert set(pred["bnn_ts"]) >= {"pbar", "logits", "entropy"}


def test_ts_needs_the_validation_split(nets):
    with pytest.raises(ValueError, match="validation split"):
        evaluate_variants(
            [Variant("dnn", nets[0], 1, 0)], _data(32, 2), {}, seed=0, target_accuracy=0.9, n_bins=5,
            score="entropy", temperature_scaled=["dnn"],
        )  # fmt: skip
