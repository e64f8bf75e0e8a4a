"""The sampler contract (qbdl.quant.contract): a sampler defined here, in one class, runs a QBNN end to end."""

import pytest
import torch
from torch import Tensor, nn

from qbdl.bayes import dnn_to_bnn, mc_logits
from qbdl.quant import (
    check_options,
    convert_qat,
    prepare_qat,
    quant_layers,
    quantize_bnn,
    set_sampler,
)
from qbdl.quant.contract import (
    SampledLayer,
    Sampler,
    Weights,
    register,
    sampler_class,
    sampler_names,
    unregister,
)
from qbdl.quant.samplers import SAMPLERS


class RepackSampler(Sampler):
    """'fresh' with fresh_kernel='prepack', written against the public contract only: draw, sample, pack."""

    name = "test_repack"
    shared_sample = True

    def weights(self, layer: SampledLayer) -> Weights:
        w, bias = layer.make_sample(*layer.draw(None))
        packed = layer.prepack(w, layer.w_scale, layer.in_scale, layer.in_zp)
        return packed, layer.w_scale, bias, w if layer.trace is not None else None

    def int8_sample(self, layer: SampledLayer) -> tuple[Tensor, Tensor | None]:
        return layer.make_sample(*layer.draw(None))


@pytest.fixture
def repack():
    register(RepackSampler)
    yield RepackSampler
    unregister(RepackSampler.name)


@pytest.fixture(scope="module")
def bnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    return dnn_to_bnn(net.eval(), moped_delta=0.2).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]


def test_a_registered_sampler_runs_a_qbnn_like_the_builtin_it_copies(bnn, repack):
    assert "test_repack" in sampler_names() and "test_repack" not in SAMPLERS
    check_options(sampler="test_repack")
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    mine = quantize_bnn(bnn, _calib(), sampler="test_repack", mc_samples=1, seed=3)
    ref = quantize_bnn(bnn, _calib(), sampler="fresh", fresh_kernel="prepack", mc_samples=1, seed=3)
    assert all(isinstance(m.impl, RepackSampler) for m in quant_layers(mine) if m.bayesian)
    got, want = mc_logits(mine, x, 3, seed=5), mc_logits(ref, x, 3, seed=5)
    assert torch.equal(got, want)  # the same draws, samples and kernels: bit for bit
    assert not torch.equal(got[0], got[1])  # and a new weight sample per MC sample
    torch.manual_seed(9)
    w, _ = quant_layers(mine)[0].int8_sample()
    torch.manual_seed(9)
    assert torch.equal(w, quant_layers(ref)[0].sampled_int8_weight())
    set_sampler(ref, "test_repack")  # switching to it needs no edit elsewhere either
    assert torch.equal(mc_logits(ref, x, 3, seed=5), want)
    assert "sampler=test_repack" in repr(quant_layers(ref)[0])


def test_unknown_and_duplicate_names_are_refused(bnn, repack):
    for bad in ("gibbs", None, 3):
        with pytest.raises(ValueError, match="unknown sampler"):
            sampler_class(bad)
    with pytest.raises(ValueError, match="unknown quant.sampler 'gibbs'"):
        check_options(sampler="gibbs")
    q = quantize_bnn(bnn, _calib(), mc_samples=1)
    with pytest.raises(ValueError, match="test_repack"):  # the message lists the registered samplers
        set_sampler(q, "gibbs")
    clash = type("Clash", (Sampler,), {"name": "fresh"})
    with pytest.raises(ValueError, match="already registered"):
        register(clash)
    assert sampler_class("fresh").__name__ == "FreshSampler"


def test_class_attributes_replace_name_tests(bnn, repack):
    # flipout's per-example calibration, and QAT / the fidelity tools wanting one shared sample, come from the class
    assert [n for n in SAMPLERS if sampler_class(n).needs_input_ranges] == ["flipout"]
    assert [n for n in sampler_names() if not sampler_class(n).shared_sample] == ["flipout"]
    with pytest.raises(ValueError, match="post-training mode"):
        convert_qat(prepare_qat(bnn), sampler="flipout")
    qat = prepare_qat(bnn).train()
    with torch.no_grad():
        qat(_calib()[0])  # the activation ranges
    q = convert_qat(qat.eval(), sampler="test_repack")
    assert {m.sampler for m in quant_layers(q) if m.bayesian} == {"test_repack"}


def test_a_sampler_without_a_shared_sample_says_so(bnn):
    q = quantize_bnn(bnn, _calib(), mc_samples=1, sampler="flipout", bank_size=2)
    with pytest.raises(NotImplementedError, match="flipout"):
        quant_layers(q)[0].int8_sample()


def test_int8_sample_is_what_the_forward_computes_with(bnn):
    """A traced forward's int8 weight equals int8_sample() under the same seed (fresh and bank)."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for sampler in ("fresh", "bank"):
        q = quantize_bnn(bnn, _calib(), mc_samples=1, sampler=sampler, bank_size=3)
        q(x)  # builds the in-place sampler ('fresh') and packs the bank
        layer = quant_layers(q)[1]
        layer.trace = []
        torch.manual_seed(6)
        q(x)
        torch.manual_seed(6)
        want = [m.int8_sample()[0] for m in quant_layers(q)][1]  # every layer draws, in module order
        assert torch.equal(layer.trace[0]["w"], want), sampler


def test_a_registered_samplers_qbnn_saves_and_loads_and_an_unregistered_name_is_refused(bnn, repack, tmp_path):
    from qbdl.quant import load_qbnn, save_qbnn
    from qbdl.quant.schema import ModelFileError

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    mine = quantize_bnn(bnn, _calib(), sampler="test_repack", mc_samples=1, seed=3)
    path = tmp_path / "mine.qbdl"
    save_qbnn(mine, path)  # the schema checks sampler names against the registry when the file is read
    back = load_qbnn(path)
    assert torch.equal(mc_logits(back, x, 2, seed=6), mc_logits(mine, x, 2, seed=6))
    unregister(RepackSampler.name)
    try:
        with pytest.raises(ModelFileError, match="test_repack"):
            load_qbnn(path)
    finally:
        register(RepackSampler)
