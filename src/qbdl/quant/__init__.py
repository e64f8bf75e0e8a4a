"""INT8 quantization of Bayesian (and plain) networks: PTQ, QAT, fake-quant simulation, save/load.

The INT8 graph runs oneDNN's ops on plain uint8 / int8 tensors; no quantized tensor dtype and no torch.ao.
"""

from .activations import DeQuantize, QAdaptiveAvgPool, QAdd, QMaxPool, QReLU, Quantize
from .backend import BACKENDS, check_backend, supported_backends
from .fold import bn_scale_shift, fold_bn
from .io import load_qbnn, save_qbnn
from .layers import FRESH_KERNELS, QuantLayer
from .observers import OBSERVERS, ActObserver
from .prepared import PreparedLayer
from .ptq import (
    PTQ_OPTIONS,
    PTQOptions,
    calibrate,
    check_options,
    convert,
    prepare,
    quant_layers,
    quantize_bnn,
    set_sampler,
)
from .qat import convert_qat, finetune_qat, prepare_qat, set_fake_quant, simulate
from .samplers import SAMPLERS

__all__ = [
    "BACKENDS",
    "FRESH_KERNELS",
    "OBSERVERS",
    "PTQ_OPTIONS",
    "SAMPLERS",
    "ActObserver",
    "PTQOptions",
    "DeQuantize",
    "PreparedLayer",
    "QAdaptiveAvgPool",
    "QAdd",
    "QMaxPool",
    "QReLU",
    "QuantLayer",
    "Quantize",
    "bn_scale_shift",
    "calibrate",
    "check_backend",
    "check_options",
    "convert",
    "convert_qat",
    "finetune_qat",
    "fold_bn",
    "load_qbnn",
    "prepare",
    "prepare_qat",
    "quant_layers",
    "quantize_bnn",
    "save_qbnn",
    "set_fake_quant",
    "set_sampler",
    "simulate",
    "supported_backends",
]
