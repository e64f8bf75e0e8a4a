"""Quantization-aware training (Jacob et al. 2018) and fake-quant simulation at 8/6/4 bits."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from torch import fx, nn

from .contract import sampler_class, sampler_names
from .prepared import ObservedAdd, ObservedQuant, PreparedLayer
from .ptq import calibrate, convert, freeze_ranges, prepare


def set_fake_quant(model: nn.Module, bits: int | None) -> nn.Module:
    """Turn fake quantization on at `bits` (None: off, plain FP32) on every prepared module."""
    if bits is not None and not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    for m in model.modules():
        if isinstance(m, (PreparedLayer, ObservedQuant, ObservedAdd)):
            m.fq_bits = bits
    return model


def prepare_qat(
    model: nn.Module, backend: str = "x86", bits: int = 8, observer: str = "minmax"
) -> fx.GraphModule:
    """A fake-quantized copy of `model` (BN folded, mu/sigma/sampled weight and activations fake-quantized,
    straight-through gradients) to fine-tune with the ELBO; convert()/convert_qat() then give an INT8 QBNN.

    BN is folded with its running statistics (frozen BN, as in the late phase of Jacob et al.); activation
    ranges are running min/max updated by every forward while observers are enabled. Flipout layers are
    fake-quantized as one shared weight sample (the INT8 QBNN's semantics).
    """
    prepared = prepare(model, backend=backend, observer=observer)
    set_fake_quant(prepared, bits)
    return prepared.train(model.training)


def finetune_qat(
    model: nn.Module,
    calib: Iterable,
    train: Iterable,
    n_train: int,
    epochs: int = 1,
    lr: float = 1e-4,
    beta: float = 1.0,
    backend: str = "x86",
    observer: str = "minmax",
    mc_samples: int = 4,
    seed: int = 0,
    fake_quant: bool = True,
) -> fx.GraphModule:
    """A short QAT fine-tune of a BNN: PTQ-calibrated activation ranges (frozen), then `epochs` passes of the
    ELBO over `train` ((x, y) batches; n_train examples in the full training set) with fake-quantized weights
    and activations (straight-through gradients). Returns the QAT model in eval mode; convert_qat() it.

    Frozen ranges: the fine-tune adapts mu and sigma to the int8 grids the calibration chose, so a QBNN
    after QAT differs from the PTQ one by its weights only. Adam at `lr`; the input model is untouched.
    fake_quant=False: the same steps in FP32 (the control that tells QAT's effect from more training's).
    """
    import torch

    from qbdl.bayes.loss import elbo_loss

    if epochs < 1:
        raise ValueError(f"finetune_qat: epochs must be >= 1, got {epochs}")
    prepared = prepare(model, backend=backend, observer=observer)
    freeze_ranges(calibrate(prepared, calib, mc_samples=mc_samples, seed=seed))
    set_fake_quant(prepared, 8 if fake_quant else None)
    opt = torch.optim.Adam([p for p in prepared.parameters() if p.requires_grad], lr=lr)
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random stream left as it was
        torch.manual_seed(seed)
        prepared.train()
        for _ in range(epochs):
            for x, y in train:
                opt.zero_grad()
                elbo_loss(prepared(x), y, prepared, n_train, beta).backward()
                opt.step()
    return prepared.eval()


def convert_qat(
    prepared: fx.GraphModule, sampler: str = "fresh", bank_size: int = 16, seed: int = 0
) -> fx.GraphModule:
    """INT8 QBNN from a QAT model (the same conversion as PTQ, using the trained weights and ranges)."""
    if not sampler_class(sampler).shared_sample:
        shared = [n for n in sampler_names() if sampler_class(n).shared_sample]
        raise ValueError(
            f"convert_qat: QAT fine-tunes one shared weight sample per pass, so it converts with a sampler of one "
            f"shared sample ({shared}); sampler {sampler!r} (per-example samples) is a post-training mode: "
            f"quantize_bnn(bnn, train_batches, sampler={sampler!r}) on the BNN"
        )
    bits = next((m.fq_bits for m in prepared.modules() if isinstance(m, PreparedLayer)), 8)
    if bits not in (None, 8):
        raise ValueError(f"only 8-bit QAT models convert to INT8 kernels (this one uses {bits} bits)")
    return convert(prepared, sampler=sampler, bank_size=bank_size, seed=seed)


def simulate(
    model: nn.Module,
    bits: int = 8,
    batches: Iterable = (),
    calib_batches: int | None = None,
    mc_samples: int = 4,
    observer: str = "minmax",
    seed: int = 0,
) -> fx.GraphModule:
    """Fake-quant copy of `model` at `bits` (weights per-channel symmetric, activations per tensor), calibrated
    in FP32 on `batches` (training data); runs on any device, for bit-width studies. Evaluate it like the model.
    """
    prepared = prepare(model, backend=None, observer=observer)
    if calib_batches is not None:
        batches = itertools.islice(batches, calib_batches)
    freeze_ranges(
        calibrate(prepared, batches, mc_samples=mc_samples, seed=seed)
    )  # evaluation must not move them
    set_fake_quant(prepared, bits)
    return prepared.eval()
