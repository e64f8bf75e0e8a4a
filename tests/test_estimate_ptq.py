"""The run estimate times quantize_bnn's own stages (quant.PTQOptions), with the run's PTQ options."""

import itertools
from types import SimpleNamespace

import torch

from qbdl import quant
from qbdl.experiment import estimate as E
from qbdl.models import resnet20


def test_estimate_runs_the_ptq_stages_with_the_options_it_is_given(monkeypatch):
    ticks = itertools.count()
    clock = SimpleNamespace(perf_counter=lambda: float(next(ticks)))  # the estimate's clock only
    monkeypatch.setattr(E, "time", clock)  # every stage takes 1 s
    monkeypatch.setattr(E, "_seconds", lambda fn, reps=2: 1.0)
    seen = {}

    def forward_seconds(model, x, device):
        layers = quant.quant_layers(model)
        if layers:
            seen[type(model).__name__] = {m.sampler for m in layers if m.bayesian} or {"none"}
        return 1.0

    monkeypatch.setattr(E, "_forward_seconds", forward_seconds)
    options = {
        "sampler": "flipout",
        "bank_size": 2,
        "calib_batches": 3,
        "mc_samples": 2,
        "observer": "minmax",
    }
    assert set(options) <= set(quant.PTQ_OPTIONS)
    est = E.estimate_run(
        dnn=resnet20(10, 1), train_batch=(torch.randn(4, 1, 16, 16), torch.arange(4)),
        eval_batch=torch.randn(8, 1, 16, 16), n_train=100, dnn_steps=0, bnn_steps=0, val_images=0,
        val_mc_samples=1, bayes={}, quant_options=options, quantize_dnn=True,
        variants=["qbnn", "qdnn"], mc_samples=4, images={"test": 8, "ood": 0, "val": 0, "shift": 0},
    )  # fmt: skip
    # flipout's per-example ranges were calibrated (else convert refuses it): the real prepare stage ran
    assert seen == {"QBNN": {"flipout"}, "QDNN": {"none"}}
    # prepare 1 s + one calibration pass 1 s scaled to 3 batches x 2 MC samples + convert 1 s, per model
    assert est["seconds"]["calibration"] == 2 * (1 + 3 * 2 + 1)
