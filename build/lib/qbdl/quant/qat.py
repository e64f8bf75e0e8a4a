"""Quantization-aware training (Jacob et al. 2018) and fake-quant simulation at 8/6/4 bits."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from torch import fx, nn

from .prepared import ObservedAdd, ObservedQuant, PreparedLayer
from .ptq import calibrate, convert, prepare


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


def convert_qat(
    prepared: fx.GraphModule, mode: str = "fresh", bank_size: int = 16, seed: int = 0
) -> fx.GraphModule:
    """INT8 QBNN from a QAT model (the same conversion as PTQ, using the trained weights and ranges)."""
    if mode == "flipout":
        raise ValueError(
            "convert_qat: QAT fine-tunes one shared weight sample per pass, so it converts with mode 'fresh' or "
            "'bank'; per-example INT8 Flipout is a post-training mode: quantize_bnn(bnn, train_batches, "
            "mode='flipout') on the BNN"
        )
    bits = next((m.fq_bits for m in prepared.modules() if isinstance(m, PreparedLayer)), 8)
    if bits not in (None, 8):
        raise ValueError(f"only 8-bit QAT models convert to INT8 kernels (this one uses {bits} bits)")
    return convert(prepared, mode=mode, bank_size=bank_size, seed=seed)


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
    calibrate(prepared, batches, mc_samples=mc_samples, seed=seed)
    for m in prepared.modules():
        if hasattr(m, "obs"):
            m.obs.enabled = False  # frozen ranges: evaluation must not move them
    set_fake_quant(prepared, bits)
    return prepared.eval()
