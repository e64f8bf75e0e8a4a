"""The ONNX building blocks of the export: a graph accumulator and the INT8 layers in standard operators.

Two ways to run an INT8 conv / linear, both on a constant int8 weight:

- QDQ (`int8_kernel`): DequantizeLinear of the uint8 activation and of the weight, Conv / Gemm, an int32 bias on
  the accumulator's grid (input scale x weight scale) and QuantizeLinear: ONNX Runtime fuses it into one
  `QLinearConv` / `QGemm` with a pre-packed weight, OpenVINO runs it as an INT8 kernel. Used where qbdl's bias
  lies on that grid (deterministic layers).
- Exact float bias (`int8_float_bias`): the accumulator of uint8 x int8 (a float Conv / Gemm of the integer
  values, or ConvInteger / MatMulInteger: INTEGER_ACC), times input scale x weight scale per channel, Add of a
  float32 bias, then requantization:
  the arithmetic of qbdl's oneDNN kernel, which adds its float bias to the scaled accumulator before
  requantizing. Used where qbdl's bias is off that grid (a Flipout layer's mean term, whose bias is in units of
  input scale x the *sample* scale, and its perturbation term, which adds the bias noise).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qbdl.quant.layers import QuantLayer

OPSET = 21
U8, I8, I32, I64, F32, F64 = (
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
)


# How the exact-bias kernel gets its accumulator. False: a float32 Conv / Gemm of the integer-valued operands
# (x - zp and the int8 weight as floats: exact while partial sums stay below 2**24), which ONNX Runtime runs with
# its optimized float kernels; True: ConvInteger / MatMulInteger (exact int32), which ONNX Runtime 1.32 runs 5-8x
# slower (measured on a ResNet-20 32x32 QBNN, 2 AVX2 cores: 80% of the graph's time in ConvInteger). With float
# ONNX Runtime's basic graph optimizations change some sums' rounding: the digits ResNet-20's same-noise logits
# are 99.94% within 1 LSB of qbdl's (98.3% bit-equal) instead of 99.98% (99.7%).
INTEGER_ACC = False


class ExportError(ValueError):
    """The model cannot be expressed as this exporter's ONNX graph."""


def layer_attr(q: object, *names: str):
    """The first of `names` that `q` has (a layer's private member may be renamed to a public one)."""
    for n in names:
        if hasattr(q, n):
            return getattr(q, n)
    raise ExportError(
        f"{type(q).__name__} has none of {names}: this qbdl's INT8 layers are not the exporter's"
    )


def bias_scale(q: QuantLayer) -> torch.Tensor:
    """Per-channel unit of the layer's int32 bias in qbdl (input scale x sample scale for a Bayesian layer)."""
    return layer_attr(q, "bias_scale", "_bias_scale")


class Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, names: set[str] | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set() if names is None else names  # shared with a subgraph's: SSA across scopes
        self._consts: dict[tuple, str] = {}

    def name(self, base: str) -> str:
        base = base.replace(".", "_")
        n, i = base, 0
        while n in self.names:
            i += 1
            n = f"{base}_{i}"
        self.names.add(n)
        return n

    def const(self, base: str, value: np.ndarray, share: bool = True) -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if share and value.size <= 64 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(value, n))
        if key is not None:
            self._consts[key] = n
        return n

    def op(self, op_type: str, inputs: list[str], base: str, n_out: int = 1, **attrs) -> str | list[str]:
        outs = [self.name(f"{base}_{op_type.lower()}" if n_out == 1 else f"{base}_{op_type.lower()}{i}")
                for i in range(n_out)]  # fmt: skip
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=self.name(f"n_{base}_{op_type}"), **attrs)
        )
        return outs[0] if n_out == 1 else outs

    # -- (de)quantization with scalar qparams

    def q(self, x: str, scale: float, zp: int, base: str) -> str:
        return self.op(
            "QuantizeLinear", [x, self.const("s", np.float32(scale)), self.const("z", np.uint8(zp))], base
        )

    def dq(self, x: str, scale: float, zp: int, base: str) -> str:
        return self.op("DequantizeLinear", [x, self.const("s", np.float32(scale)), self.const("z", np.uint8(zp))],
                       base)  # fmt: skip

    def clip_u8(self, x: str, lo: int, hi: int, base: str) -> str:
        """Clamp a uint8 tensor to lo..hi (ReLU on the grid and the reduced activation range); no-op when 0..255."""
        if lo <= 0 and hi >= 255:
            return x
        return self.op("Clip", [x, self.const("lo", np.uint8(max(lo, 0))), self.const("hi", np.uint8(min(hi, 255)))],
                       base)  # fmt: skip

    def weight(self, w: torch.Tensor, scale: torch.Tensor, base: str) -> str:
        """DequantizeLinear of a constant int8 weight, per output channel (axis 0)."""
        wq = self.const(f"{base}_w", w.detach().cpu().to(torch.int8).numpy(), share=False)
        s = self.const(f"{base}_ws", scale.detach().cpu().float().numpy().astype(np.float32), share=False)
        z = self.const(f"{base}_wz", np.zeros(w.shape[0], np.int8), share=False)
        return self.op("DequantizeLinear", [wq, s, z], f"{base}_w", axis=0)

    def bias(self, b: np.ndarray, scale: np.ndarray, base: str) -> str:
        """DequantizeLinear of a constant int32 bias in units of input scale x weight scale (per channel)."""
        bq = self.const(f"{base}_b", b.astype(np.int32), share=False)
        s = self.const(f"{base}_bs", scale.astype(np.float32), share=False)
        z = self.const(f"{base}_bz", np.zeros(len(b), np.int32), share=False)
        return self.op("DequantizeLinear", [bq, s, z], f"{base}_b", axis=0)


def conv_attrs(q: QuantLayer) -> dict:
    c = q.config
    k = list(q.mu_q.shape[2:])
    pads = [int(p) for p in c["padding"]]
    return {
        "kernel_shape": k,
        "strides": [int(s) for s in c["stride"]],
        "pads": pads + pads,
        "dilations": [int(d) for d in c["dilation"]],
        "group": int(c["groups"]),
    }


def _check_kind(q: QuantLayer) -> None:
    if q.kind not in ("conv2d", "linear"):
        raise ExportError(
            f"INT8 layer {q.index} is a {q.kind}; the ONNX export covers conv2d and linear layers"
        )


def int8_kernel(g: Graph, q: QuantLayer, x: str, w: torch.Tensor, w_scale: torch.Tensor, in_scale: float,
                in_zp: int, bias: str | None, base: str) -> str:  # fmt: skip
    """Float output of the layer's conv / linear on uint8 `x` (QDQ: runtimes fuse it with the following Q)."""
    _check_kind(q)
    xd = g.dq(x, in_scale, in_zp, base)
    wd = g.weight(w, w_scale, base)
    if q.kind == "conv2d":
        return g.op("Conv", [xd, wd] + ([bias] if bias else []), base, **conv_attrs(q))
    return g.op("Gemm", [xd, wd] + ([bias] if bias else []), base, transB=1)


def int8_float_bias(g: Graph, q: QuantLayer, x: str, w: torch.Tensor, w_scale: torch.Tensor, in_scale: float,
                    in_zp: int, bias: str | None, base: str) -> str:  # fmt: skip
    """acc * (in_scale x w_scale) + bias in float32, acc the exact int32 accumulator of uint8 `x` and int8 `w`.

    qbdl's oneDNN kernel computes this before requantizing (the combined scale a float32 product, per output
    channel); `bias` (float32, broadcastable to the output) need not lie on any grid.
    """
    _check_kind(q)
    wq = w.detach().cpu().to(torch.int8)
    if INTEGER_ACC:
        xz = g.const("xz", np.uint8(in_zp))
        if q.kind == "conv2d":
            acc = g.op(
                "ConvInteger", [x, g.const(f"{base}_w", wq.numpy(), share=False), xz], base, **conv_attrs(q)
            )
        else:
            acc = g.op("MatMulInteger", [x, g.const(f"{base}_wt", wq.t().contiguous().numpy(), share=False), xz],
                       base)  # fmt: skip
        acc = g.op("Cast", [acc], base, to=F32)
    else:
        xf = g.dq(x, 1.0, in_zp, base)
        wf = g.const(f"{base}_wf", wq.numpy().astype(np.float32), share=False)
        if q.kind == "conv2d":
            acc = g.op("Conv", [xf, wf], base, **conv_attrs(q))
        else:
            acc = g.op("Gemm", [xf, wf], base, transB=1)
    unit = (np.float32(in_scale) * w_scale.detach().cpu().float().numpy()).astype(np.float32)
    y = g.op(
        "Mul", [acc, g.const(f"{base}_u", unit.reshape((-1,) + (1,) * (w.dim() - 2)), share=False)], base
    )
    return y if bias is None else g.op("Add", [y, bias], base)


def requant_fma(g: Graph, y: str, scale: float, zp: int, base: str) -> str:
    """uint8 of rint(fma(y, 1 / scale, zp)) (saturated): oneDNN's requantization of a float32 result `y`.

    The fused multiply-add as a float64 product and sum (exact for a float32 times a float32 plus an 8-bit
    integer) rounded once to float32; QuantizeLinear divides by its scale instead, which rounds differently.
    """
    inv = np.float64(np.float32(1) / np.float32(scale))
    t = g.op("Mul", [g.op("Cast", [y], base, to=F64), g.const("inv64", inv)], base)
    t = g.op("Cast", [g.op("Add", [t, g.const("zp64", np.float64(zp))], base)], base, to=F32)
    return g.op("QuantizeLinear", [t, g.const("one", np.float32(1)), g.const("z", np.uint8(0))], base)


def channel_bias(g: Graph, q: QuantLayer, b: torch.Tensor, base: str) -> str:
    """A constant float32 bias [C] as a tensor broadcastable to the layer's output ([C, 1, 1] for a conv)."""
    v = b.detach().cpu().float().numpy().astype(np.float32)
    if q.kind == "conv2d":
        v = v.reshape(-1, 1, 1)
    return g.const(f"{base}_fb", v, share=False)


def det_bias(g: Graph, q: QuantLayer, base: str) -> str | None:
    """The deterministic bias as DequantizeLinear of int32 in units of in_scale * mu_scale (what QLinearConv adds).

    A Bayesian layer's bias (units of in_scale * S, S the sample scale) is re-rounded to the mean kernel's units
    here (an error below half an accumulator unit); a deterministic layer's is on that grid already.
    """
    if q.bias_q is None:
        return None
    b = q.bias_q.double() * (bias_scale(q).double() if q.bayesian else q.in_scale * q.mu_scale.double())
    unit = q.in_scale * q.mu_scale.double()
    bq = torch.round(b / unit).clamp(-(2**31), 2**31 - 1).numpy()
    return g.bias(bq, unit.numpy(), base)


def det_layer(g: Graph, q: QuantLayer, x: str, base: str) -> str:
    """A deterministic INT8 layer (or a Bayesian one at its mean): Q(relu(conv(x, mu) + b)), clamped to qmax."""
    y = int8_kernel(g, q, x, q.mu_q, q.mu_scale, q.in_scale, q.in_zp, det_bias(g, q, base), base)
    if q.relu:
        y = g.op("Relu", [y], base)
    y = g.q(y, q.out_scale, q.out_zp, base)
    return g.clip_u8(y, 0, q.qmax, base)


def qadd(g: Graph, inputs: tuple, scale: float, zp: int, relu: bool, qmax: int, a: str, b: str, base: str,
         exact: bool = False) -> str:  # fmt: skip
    """A residual add of two uint8 activations, requantized (+ ReLU), clamped to 0..qmax.

    exact=False: DequantizeLinear, Add, QuantizeLinear (ONNX Runtime fuses it into QLinearAdd, whose fixed-point
    arithmetic rounds an output here and there one LSB away from qbdl's). exact=True: qbdl's qadd kernel
    (c = fma(q_a, s_a, -z_a s_a) + fma(q_b, s_b, -z_b s_b), q = z_o + rint(c * (1 / s_o)) in float32), the
    fused multiply-add as float64 products and sums (exact for 8-bit integers) rounded once to float32.
    """
    (sa, za), (sb, zb) = inputs
    if not exact:
        s = g.op("Add", [g.dq(a, sa, za, base), g.dq(b, sb, zb, base)], base)
        y = g.q(s, scale, zp, base)
    else:
        terms = []
        for v, s, z in ((a, sa, za), (b, sb, zb)):
            fs = np.float32(s)
            p = np.float32(fs * np.float32(-z))
            t = g.op("Mul", [g.op("Cast", [v], base, to=F64), g.const("s64", np.float64(fs))], base)
            t = g.op("Add", [t, g.const("p64", np.float64(p))], base)
            terms.append(g.op("Cast", [t], base, to=F32))
        c = g.op(
            "Mul",
            [g.op("Add", terms, base), g.const("inv", np.float32(np.float32(1) / np.float32(scale)))],
            base,
        )
        y = g.op("QuantizeLinear", [c, g.const("one", np.float32(1)), g.const("z", np.uint8(zp))], base)
    return g.clip_u8(y, zp if relu else 0, qmax, base)
