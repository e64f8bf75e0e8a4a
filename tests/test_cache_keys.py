"""What a cached result is keyed by: every setting that changes a prediction recomputes it; calibration is shared."""

from types import SimpleNamespace

import torch
from torch import nn

from qbdl import quant
from qbdl.bayes import dnn_to_bnn
from qbdl.data import DigitsDataModule
from qbdl.experiment.evaluate import Variant, evaluate_variants, variant_fingerprint
from qbdl.lit import callbacks as cb_mod
from qbdl.quant import calibrate, convert, prepare


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()


def _prepared():
    bnn = dnn_to_bnn(_net(), moped_delta=0.1).eval()
    return calibrate(prepare(bnn), [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))])


def test_variant_key_follows_every_quantization_option_the_seed_and_the_data():
    prep = _prepared()
    base = dict(sampler="fresh", bank_size=4, seed=0, fresh_kernel="auto", noise_slots=16)

    def key(eval_seed=0, data="d", samples=4, **kw):
        q = convert(prep, **(base | kw))
        return variant_fingerprint(Variant("qbnn", q, samples, 0), eval_seed, data)

    ref = key()
    assert key() == ref  # the same options: the same key
    changed = [
        key(sampler="bank"),
        key(bank_size=8, sampler="bank"),
        key(seed=3),  # the model's noise seed (quant.seed)
        key(eval_seed=3),  # the MC seeds (eval.seed)
        key(fresh_kernel="prepack"),
        key(data="other split"),
        key(samples=8),
    ]
    assert len(set(changed)) == len(changed) and ref not in changed
    assert key(noise_slots=8) == ref  # accepted but ignored: the noise is generated, no pool has slots
    other_observer = convert(
        calibrate(
            prepare(dnn_to_bnn(_net(), moped_delta=0.1).eval(), observer="histogram"),
            [torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))],
        )
    )
    assert variant_fingerprint(Variant("qbnn", other_observer, 4, 0), 0, "d") != ref


def test_eval_cache_recomputes_when_the_data_key_changes(tmp_path):
    q = convert(_prepared(), sampler="bank", bank_size=2)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    loader = [(x, torch.tensor([0, 1, 2, 0, 1, 2]))]
    kw = dict(seed=0, target_accuracy=0.9, n_bins=5, score="entropy", cache_dir=tmp_path)
    evaluate_variants([Variant("qbnn", q, 2, 0)], loader, {}, data_key="a", **kw)
    evaluate_variants([Variant("qbnn", q, 2, 0)], loader, {}, data_key="a", **kw)
    assert len(list(tmp_path.glob("qbnn-*.safetensors"))) == 1  # reused
    evaluate_variants([Variant("qbnn", q, 2, 0)], loader, {}, data_key="b", **kw)
    assert len(list(tmp_path.glob("qbnn-*.safetensors"))) == 2  # another data split: recomputed


def test_qbnn_and_qdnn_are_calibrated_on_the_same_batches_and_stale_models_are_redone(tmp_path, monkeypatch):
    dm = DigitsDataModule(image_size=8, batch_size=16)
    dm.setup()
    seen: dict[str, list] = {}
    real = quant.quantize_bnn

    def spy(model, batches, **kw):  # records what the real quantize_bnn is given, then runs it
        batches = list(batches)
        seen[f"call{len(seen)}"] = [b[0].clone() for b in batches]
        return real(model, batches, **kw)

    monkeypatch.setattr(cb_mod.quant, "quantize_bnn", spy)
    dnn = _net()

    def ptq_callback(observer: str) -> cb_mod.PTQCallback:
        opts = dict(backend="x86", sampler="bank", bank_size=2, calib_batches=3, mc_samples=1, seed=0)
        return cb_mod.PTQCallback(str(tmp_path), quantize_dnn=True, reference=dnn, observer=observer, **opts)

    ptq = ptq_callback(observer="minmax")
    trainer = SimpleNamespace(is_global_zero=True, datamodule=dm)
    ptq.on_fit_end(trainer, SimpleNamespace(model=dnn_to_bnn(dnn, moped_delta=0.1).eval()))
    qbnn_batches, qdnn_batches = seen["call0"], seen["call1"]
    assert len(qbnn_batches) == 3
    assert all(torch.equal(a, b) for a, b in zip(qbnn_batches, qdnn_batches))
    # a resumed run with the same options reuses the saved models...
    again = ptq_callback(observer="minmax")
    again.on_fit_end(trainer, SimpleNamespace(model=dnn_to_bnn(dnn, moped_delta=0.1).eval()))
    assert len(seen) == 2
    # ...and one with another option (here the observer) quantizes again instead of loading stale files
    other = ptq_callback(observer="histogram")
    other.on_fit_end(trainer, SimpleNamespace(model=dnn_to_bnn(dnn, moped_delta=0.1).eval()))
    assert len(seen) == 4
