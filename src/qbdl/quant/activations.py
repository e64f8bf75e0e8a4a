"""The INT8 graph's modules on activations: (de)quantization, residual add, ReLU and pooling on plain uint8.

Each knows the scale and zero point of what it reads (wired from the graph by quant.lower) and writes, so no
quantized tensor dtype is ever created. Rounding follows ATen's quantized kernels, so the integers equal
those of the deprecated quantized tensors (tests/test_quant_engine.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .backend import FULL_QMAX


def clamp_qmax(y: Tensor, qmax: int) -> Tensor:
    """Clamp a uint8 activation to 0..qmax in place (reduced range: the next kernel's int16 pairs stay exact)."""
    return y if qmax >= FULL_QMAX else y.clamp_(max=qmax)


def quantize_act(x: Tensor, scale: float, zero_point: int, qmax: int = FULL_QMAX) -> Tensor:
    """FP32 -> uint8: zero_point + round(x * (1/scale)), with 1/scale in float32 and ties to even.

    The rounding of torch.quantize_per_tensor (fbgemm's Quantize), so the integers equal those of the
    deprecated quantized tensors (tests/test_quant_engine.py).
    """
    inv = float(torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32))
    return torch.round(x.float() * inv).add_(zero_point).clamp_(0, qmax).to(torch.uint8)


def dequantize_act(u: Tensor, scale: float, zero_point: int) -> Tensor:
    """uint8 -> FP32: (u - zero_point) * scale."""
    return (u.float() - zero_point) * scale


class Quantize(nn.Module):
    """FP32 -> uint8 per tensor with calibrated scale / zero point (values 0..qmax)."""

    def __init__(self, scale: float, zero_point: int, qmax: int = FULL_QMAX) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmax = float(scale), int(zero_point), int(qmax)

    def forward(self, x: Tensor) -> Tensor:
        return quantize_act(x, self.scale, self.zero_point, self.qmax)

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {"scale": self.scale, "zero_point": self.zero_point, "qmax": self.qmax}


class Wired(nn.Module):
    """A module whose input qparams come from the graph (quant.lower.lower sets `inputs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[float, int]] = []

    def spec(self) -> dict:
        """JSON-able constructor arguments (the input qparams are re-derived from the graph on load)."""
        return {}


class DeQuantize(Wired):
    """uint8 -> FP32 with its input's qparams."""

    def forward(self, x: Tensor) -> Tensor:
        return dequantize_act(x, *self.inputs[0])


class QReLU(Wired):
    """ReLU of a uint8 activation: max(q, zero point)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp_min(self.inputs[0][1])


class QAdaptiveAvgPool(Wired):
    """Adaptive average pooling of a uint8 activation, output on the input's grid (as quantized pooling does).

    Rounding as ATen's quantized kernels: zp + round(mean(q - zp)) for channels-last input, round(mean(q))
    for contiguous input (they differ only on ties).
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        zp = self.inputs[0][1]
        pool = F.adaptive_avg_pool2d if x.dim() == 4 else F.adaptive_avg_pool3d
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            y = torch.round(pool(x.float() - zp, self.output_size)).add_(zp)
        else:
            y = torch.round(pool(x.float(), self.output_size))
        return y.clamp_(0, 255).to(torch.uint8)

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {"output_size": self.output_size}


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pool_out(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Output length of a pooling window (torch's rule, incl. ceil_mode's last window starting inside)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class QMaxPool(nn.Module):
    """Max pooling of a uint8 activation (the grid is kept: max commutes with the affine map).

    torch's integer max pooling refuses planes of more than 255 values (it checks the plane size against the
    dtype's maximum): 2-D pooling runs qbdl's C++ kernel on the uint8 values, other cases pool float copies
    (which hold 0..255 exactly).
    """

    def __init__(
        self, dim: int, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False
    ) -> None:
        super().__init__()
        self.dim, self.kernel_size, self.stride = int(dim), kernel_size, stride
        self.padding, self.dilation, self.ceil_mode = padding, dilation, bool(ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        if self.dim == 2 and x.dim() == 4 and native.available():
            k, st, p, d = (_pair(v) for v in (self.kernel_size, self.stride or self.kernel_size, self.padding,
                                              self.dilation))  # fmt: skip
            out = [_pool_out(x.shape[2 + i], k[i], st[i], p[i], d[i], self.ceil_mode) for i in range(2)]
            return torch.ops.qbdl.max_pool2d_u8(x, *k, *st, *p, *d, *out)
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.dim - 1]
        y = pool(x.float(), self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return y.to(torch.uint8)

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {"dim": self.dim, "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "ceil_mode": self.ceil_mode}  # fmt: skip


class QAdd(Wired):
    """Residual add (+ReLU) of two uint8 activations with a calibrated output scale / zero point."""

    def __init__(self, relu: bool, scale: float, zero_point: int, qmax: int = FULL_QMAX) -> None:
        super().__init__()
        self.relu, self.scale, self.zero_point = bool(relu), float(scale), int(zero_point)
        self.qmax = int(qmax)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        (sa, za), (sb, zb) = self.inputs
        if native.available():
            return torch.ops.qbdl.qadd(
                a, sa, za, b, sb, zb, self.scale, self.zero_point, self.relu, self.qmax
            )
        c = dequantize_act(a, sa, za) + dequantize_act(b, sb, zb)
        return quantize_act(c.clamp_min_(0) if self.relu else c, self.scale, self.zero_point, self.qmax)

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {"relu": self.relu, "scale": self.scale, "zero_point": self.zero_point, "qmax": self.qmax}
