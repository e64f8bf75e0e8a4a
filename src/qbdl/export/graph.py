"""A qbdl INT8 graph (qdnn, or a QBNN with sampler 'flipout') as an ONNX model in standard operators only.

Every conv / linear is QDQ: DequantizeLinear of a uint8 activation and of a constant int8 weight (per output
channel), Conv / Gemm, QuantizeLinear, so ONNX Runtime and OpenVINO run it as an INT8 kernel with constant
weights. A QBNN layer is per-example INT8 Flipout exactly as qbdl's 'flipout' sampler computes it:

    y1 = Q(conv(x, mu))                           the mean term, uint8 at (mean_scale, mean_zp)
    xf = Q(s_in * (x - zp) / 2)                   sign-flipped input, uint8 at (2 * in_scale, (qmax + 1) // 2)
    y2 = Q(conv(xf, delta_k) + s_out * b_noise)   the perturbation term, uint8 at (pert_scale, 128)
    y  = Q(ka * (y1 - mean_zp) + s_out * kb * (y2 - 128))   (+ ReLU, clamp to 0..qmax)

with random signs s_in / s_out per example and channel, delta_k int8 perturbations banked from the QBNN's seed
(MC sample s uses entry s mod K), and S Monte Carlo samples folded into the batch (row s * N + n), so one
session run gives every sample of every image. The signs and the bias noise are either graph inputs (`noise=
"input"`: feed qbdl's own draws, qbdl.export.reference) or made inside the graph from a `seed` input by a
counter hash, exact in int32 and in float32 arithmetic (`noise="seed"`): no RandomNormal/RandomUniform op, whose seeding differs
between runtimes. Outputs: `probs` (the predictive mean [N, C]), `entropy`, `mi` (mutual information, >= 0)
and `logits` [S, N, C].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx

from qbdl.quant.activations import DeQuantize, QAdaptiveAvgPool, QAdd, QMaxPool, QReLU, Quantize
from qbdl.quant.layers import QuantLayer
from qbdl.quant.samplers import FlipoutSampler

OPSET = 21
# The counter hash: a prime whose square fits float32's 24-bit mantissa, so every product stays exact whether a
# runtime computes int32 element-wise ops in integers or in float32 (OpenVINO's CPU plugin may do either).
HASH_P = 4093
_HASH_A = (2039, 3001, 1021)
U8, I8, I32, I64, F32 = (
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.FLOAT,
)


class ExportError(ValueError):
    """The model cannot be expressed as this exporter's ONNX graph."""


@dataclass
class NoiseLayout:
    """Where each Flipout layer's signs and bias noise sit in the `signs` [S*N, T] / `bias_noise` [S, B] inputs."""

    sign_cols: int = 0
    bias_cols: int = 0
    layers: list[dict] = field(
        default_factory=list
    )  # {"name", "s_in": (a, b), "s_out": (a, b), "bias": (a, b)|None}
    values: dict[str, str] = field(
        default_factory=dict
    )  # qbdl graph node -> its ONNX value (uint8 activations)


class _Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: set[str] = set()
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


def _conv_attrs(q: QuantLayer) -> dict:
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


def _int8_kernel(g: _Graph, q: QuantLayer, x: str, w: torch.Tensor, w_scale: torch.Tensor, in_scale: float,
                 in_zp: int, bias: str | None, base: str) -> str:  # fmt: skip
    """Float output of the layer's conv / linear on uint8 `x` (QDQ: runtimes fuse it with the following Q)."""
    xd = g.dq(x, in_scale, in_zp, base)
    wd = g.weight(w, w_scale, base)
    if q.kind == "conv2d":
        return g.op("Conv", [xd, wd] + ([bias] if bias else []), base, **_conv_attrs(q))
    if q.kind == "linear":
        return g.op("Gemm", [xd, wd] + ([bias] if bias else []), base, transB=1)
    raise ExportError(f"INT8 layer {q.index} is a {q.kind}; the ONNX export covers conv2d and linear layers")


def _det_bias(g: _Graph, q: QuantLayer, base: str) -> str | None:
    """The deterministic bias as DequantizeLinear of int32 in units of in_scale * mu_scale (what QLinearConv adds).

    qbdl keeps a Bayesian layer's bias in units of in_scale * S (S: the sample scale); it is re-rounded to the
    mean kernel's units here (an error below half an accumulator unit).
    """
    if q.bias_q is None:
        return None
    b = q.bias_q.double() * (q._bias_scale.double() if q.bayesian else q.in_scale * q.mu_scale.double())
    unit = q.in_scale * q.mu_scale.double()
    bq = torch.round(b / unit).clamp(-(2**31), 2**31 - 1).numpy()
    return g.bias(bq, unit.numpy(), base)


def _det_layer(g: _Graph, q: QuantLayer, x: str, base: str) -> str:
    """A deterministic INT8 layer (or a Bayesian one at its mean): Q(relu(conv(x, mu) + b)), clamped to qmax."""
    y = _int8_kernel(g, q, x, q.mu_q, q.mu_scale, q.in_scale, q.in_zp, _det_bias(g, q, base), base)
    if q.relu:
        y = g.op("Relu", [y], base)
    y = g.q(y, q.out_scale, q.out_zp, base)
    return g.clip_u8(y, 0, q.qmax, base)


class _Noise:
    """The per-layer signs and bias noise: slices of the `signs` / `bias_noise` tensors (inputs or hashed)."""

    def __init__(self, g: _Graph, layout: NoiseLayout, samples: int) -> None:
        self.g, self.layout, self.samples = g, layout, samples
        self.signs: str | None = None  # float32 [S*N, T] of +-1
        self.bias_noise: str | None = None  # float32 [S, B]
        self.n: str | None = None  # int64 [1]: the batch size N

    def cols(self, src: str, a: int, b: int, base: str) -> str:
        g = self.g
        return g.op("Slice", [src, g.const("st", np.array([a], np.int64)), g.const("en", np.array([b], np.int64)),
                              g.const("ax", np.array([1], np.int64))], base)  # fmt: skip

    def per_row_bias(self, a: int, b: int, base: str) -> str:
        """Bias noise of columns a:b expanded to the S*N rows: sample s's draw for each of its N rows."""
        g = self.g
        e = self.cols(self.bias_noise, a, b, base)  # [S, c]
        e = g.op("Unsqueeze", [e, g.const("ax1", np.array([1], np.int64))], base)  # [S, 1, c]
        shape = g.op("Concat", [g.const("S", np.array([self.samples], np.int64)), self.n,
                                g.const("c", np.array([b - a], np.int64))], base, axis=0)  # fmt: skip
        e = g.op("Expand", [e, shape], base)
        return g.op("Reshape", [e, g.const("rc", np.array([-1, b - a], np.int64))], base)


def _hash(
    g: _Graph, r: tuple[str, str], j: tuple[str, str], seed: tuple[str, str], salt: int, base: str
) -> str:
    """int32 hash in [0, HASH_P) of a row (two base-P digits), a column (two digits), the seed and a salt.

    Rounds of squaring modulo the prime HASH_P (< 2**12): every intermediate stays below 2**24, so the result
    is the same whether a runtime computes the int32 ops in integers or in float32 (OpenVINO's CPU plugin does
    the latter for some element-wise ops).
    """
    p = g.const("p32", np.array(HASH_P, np.int32))

    def mod(v: str) -> str:
        return g.op("Mod", [v, p], base, fmod=0)

    def add(*vs: str) -> str:
        out = vs[0]
        for v in vs[1:]:
            out = g.op("Add", [out, v], base)
        return out

    def sq(v: str) -> str:
        return g.op("Mul", [v, v], base)

    def mul(v: str, k: int) -> str:
        return g.op("Mul", [v, g.const("k", np.array(k, np.int32))], base)

    (r0, r1), (j0, j1), (s0, s1) = r, j, seed
    h1 = mod(add(mul(j0, _HASH_A[0]), r0))
    h2 = mod(add(sq(h1), j1, g.const("salt", np.array(salt % HASH_P, np.int32))))
    h3 = mod(add(sq(h2), r1, s0))
    h4 = mod(add(mul(h3, _HASH_A[1]), h1))
    h5 = mod(add(sq(h4), j0, s1))
    h6 = mod(add(sq(h5), r0))
    h7 = mod(add(mul(h6, _HASH_A[2]), h2))
    return mod(add(sq(h7), s0))


def _hashed_noise(g: _Graph, noise: _Noise, seed: str, rows: str, layout: NoiseLayout) -> None:
    """signs [S*N, T] and bias noise [S, B] from the seed: a hash of (row, column, seed) per element."""
    s64 = g.op("Reshape", [seed, g.const("one", np.array([], np.int64))], "seed")  # scalar
    p64 = g.const("p64", np.array(HASH_P, np.int64))
    s0 = g.op("Cast", [g.op("Mod", [s64, p64], "seed", fmod=0)], "seed", to=I32)
    s1 = g.op("Cast", [g.op("Mod", [g.op("Div", [s64, p64], "seed"), p64], "seed", fmod=0)], "seed", to=I32)

    def row_digits(n_rows: str, base: str) -> tuple[str, str]:
        n = g.op("Reshape", [n_rows, g.const("one", np.array([], np.int64))], base)
        r = g.op(
            "Range",
            [g.const("zero64", np.array(0, np.int64)), n, g.const("step", np.array(1, np.int64))],
            base,
        )
        r = g.op("Unsqueeze", [r, g.const("ax1", np.array([1], np.int64))], base)  # [R, 1]
        d0 = g.op("Cast", [g.op("Mod", [r, p64], base, fmod=0)], base, to=I32)
        d1 = g.op("Cast", [g.op("Mod", [g.op("Div", [r, p64], base), p64], base, fmod=0)], base, to=I32)
        return d0, d1

    def col_digits(cols: int, base: str) -> tuple[str, str]:
        j = np.arange(cols, dtype=np.int64)[None]  # [1, T]: constants
        return (g.const(f"{base}_j0", (j % HASH_P).astype(np.int32), share=False),
                g.const(f"{base}_j1", (j // HASH_P % HASH_P).astype(np.int32), share=False))  # fmt: skip

    if layout.sign_cols:
        h = _hash(g, row_digits(rows, "signs"), col_digits(layout.sign_cols, "signs"), (s0, s1), 1, "signs")
        bit = g.op("Less", [h, g.const("half", np.array((HASH_P + 1) // 2, np.int32))], "signs")
        noise.signs = g.op("Sub", [g.op("Mul", [g.op("Cast", [bit], "signs", to=F32),
                                                g.const("two", np.float32(2))], "signs"),
                                   g.const("onef", np.float32(1))], "signs")  # fmt: skip
    if layout.bias_cols:  # Box-Muller; each uniform from two hashes (24 bits), other salts than the signs'
        r = row_digits(g.const("Srows", np.array([noise.samples], np.int64)), "eps")
        j = col_digits(layout.bias_cols, "eps")
        pf = g.const("pf", np.float32(HASH_P))
        u = []
        for i in range(2):
            hi = g.op("Cast", [_hash(g, r, j, (s0, s1), 2 + 2 * i, f"eps{i}")], f"eps{i}", to=F32)
            lo = g.op("Cast", [_hash(g, r, j, (s0, s1), 3 + 2 * i, f"eps{i}")], f"eps{i}", to=F32)
            lo = g.op("Div", [g.op("Add", [lo, g.const("halff", np.float32(0.5))], f"eps{i}"), pf], f"eps{i}")
            u.append(g.op("Div", [g.op("Add", [hi, lo], f"eps{i}"), pf], f"eps{i}"))
        rad = g.op(
            "Sqrt", [g.op("Mul", [g.op("Log", [u[0]], "eps"), g.const("m2", np.float32(-2))], "eps")], "eps"
        )
        c = g.op("Cos", [g.op("Mul", [u[1], g.const("tau", np.float32(2 * math.pi))], "eps")], "eps")
        noise.bias_noise = g.op("Mul", [rad, c], "eps")


def _flipout_layer(g: _Graph, q: QuantLayer, x: str, base: str, noise: _Noise, entry: dict, samples: int,
                   perturbations: int) -> str:  # fmt: skip
    """qbdl's FlipoutSampler.forward on S*N rows: mean term, sign-flipped perturbation term, signed add."""
    impl = q.impl
    if not isinstance(impl, FlipoutSampler):
        raise ExportError(
            f"INT8 layer {q.index} samples with {q.sampler!r}; the export runs 'flipout' layers"
        )
    c = q.config
    ms, mz, ps = float(c["mean_scale"]), int(c["mean_zp"]), float(c["pert_scale"])
    fz = FlipoutSampler.flip_zp(q)
    # mean term: bias as qbdl's flipout path adds it (units of in_scale * S, re-rounded to mu's)
    y1 = _int8_kernel(
        g, q, x, q.mu_q, q.mu_scale, q.in_scale, q.in_zp, _det_bias(g, q, f"{base}_mu"), f"{base}_mu"
    )
    y1 = g.q(y1, ms, mz, f"{base}_mu")
    # sign-flipped input: round(s_in * (x - zp) / 2) + fz, exact (DequantizeLinear / QuantizeLinear at scale 1)
    rows_shape = [-1, entry["s_in"][1] - entry["s_in"][0]] + [1] * (q.mu_q.dim() - 2)
    s_in = noise.cols(noise.signs, *entry["s_in"], f"{base}_sin")
    s_in = g.op("Mul", [s_in, g.const("halfs", np.float32(0.5))], f"{base}_sin")
    s_in = g.op("Reshape", [s_in, g.const(f"{base}_rs_in", np.array(rows_shape, np.int64))], f"{base}_sin")
    xc = g.dq(x, 1.0, q.in_zp, f"{base}_flip")
    xf = g.q(g.op("Mul", [xc, s_in], f"{base}_flip"), 1.0, fz, f"{base}_flip")
    out_shape = [-1, q.mu_q.shape[0]] + [1] * (q.mu_q.dim() - 2)
    s_out = noise.cols(noise.signs, *entry["s_out"], f"{base}_sout")
    s_out = g.op("Reshape", [s_out, g.const(f"{base}_rs_out", np.array(out_shape, np.int64))], f"{base}_sout")
    bias_noise = None
    if entry["bias"] is not None:  # qbdl: bias_sigma_q * eps * bias_scale, added by the perturbation kernel
        e = noise.per_row_bias(*entry["bias"], f"{base}_eps")
        e = g.op(
            "Mul", [e, g.const(f"{base}_bsq", q.bias_sigma_q.float().numpy(), share=False)], f"{base}_eps"
        )
        bias_noise = g.op("Mul", [e, g.const(f"{base}_bsc", q._bias_scale.float().numpy(), share=False)],
                          f"{base}_eps")  # fmt: skip
    k_used = min(perturbations, samples)

    def pert(xs: str, k: int, nb: str) -> str:
        y = _int8_kernel(g, q, xs, impl.pert_q[k], impl.w_scale, 2 * q.in_scale, fz, None, nb)
        return y

    if k_used == 1:
        y2 = pert(xf, 0, f"{base}_pert")
        if bias_noise is not None:
            y2 = g.op("Add", [y2, bias_noise], f"{base}_pert")
    else:  # sample s: entry s mod K, on its N rows

        def dims_from(t: str, start: int, head: list[int], nb: str) -> str:
            tail = g.op("Slice", [g.op("Shape", [t], nb), g.const("st", np.array([start], np.int64)),
                                  g.const("big", np.array([1 << 30], np.int64))], nb)  # fmt: skip
            return g.op("Concat", [g.const(f"{nb}_head", np.array(head, np.int64)), tail], nb, axis=0)

        xs = g.op("Reshape", [xf, dims_from(xf, 1, [samples, -1], f"{base}_split")], f"{base}_split")
        parts = g.op("Split", [xs], f"{base}_split", n_out=samples, axis=0, num_outputs=samples)
        ys = []
        for s, part in enumerate(parts):
            p = g.op("Squeeze", [part, g.const("ax0", np.array([0], np.int64))], f"{base}_s{s}")
            ys.append(g.op("Unsqueeze", [pert(p, s % perturbations, f"{base}_pert{s}"),
                                         g.const("ax0", np.array([0], np.int64))], f"{base}_s{s}"))  # fmt: skip
        y2 = g.op("Concat", ys, f"{base}_pert", axis=0)
        y2 = g.op("Reshape", [y2, dims_from(y2, 2, [-1], f"{base}_merge")], f"{base}_pert")
        if bias_noise is not None:
            y2 = g.op("Add", [y2, bias_noise], f"{base}_pert")
    y2 = g.q(y2, ps, 128, f"{base}_pert")
    # signed add: round(ka * (y1 - mz) + s_out * kb * (y2 - 128)) + out_zp, as qbdl's signed_add (float32)
    ka, kb = float(np.float32(ms / q.out_scale)), float(np.float32(ps / q.out_scale))
    a = g.dq(y1, ka, mz, f"{base}_add")
    b = g.op("Mul", [g.dq(y2, kb, 128, f"{base}_add"), s_out], f"{base}_add")
    y = g.q(g.op("Add", [a, b], f"{base}_add"), 1.0, q.out_zp, f"{base}_add")
    return g.clip_u8(y, q.out_zp if q.relu else 0, q.qmax, f"{base}_add")


def _check_meta_layer(q: QuantLayer) -> None:
    if q.in_zp is None:
        raise ExportError(
            f"INT8 layer {q.index} has no input zero point: load the model with qbdl.quant.load_qbnn"
        )


def noise_layout(model: fx.GraphModule) -> NoiseLayout:
    """The columns of each Flipout layer in `signs` (s_in then s_out) and `bias_noise`, in graph order."""
    layout = NoiseLayout()
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        q = model.get_submodule(node.target)
        if isinstance(q, QuantLayer) and q.bayesian and q.mode == "sample":
            cin, cout = int(q.mu_q.shape[1]) * int(q.config.get("groups", 1)), int(q.mu_q.shape[0])
            entry = {"name": node.target, "s_in": (layout.sign_cols, layout.sign_cols + cin)}
            layout.sign_cols += cin
            entry["s_out"] = (layout.sign_cols, layout.sign_cols + cout)
            layout.sign_cols += cout
            entry["bias"] = None
            if q.bias_q is not None and q.bias_sigma_q is not None:
                entry["bias"] = (layout.bias_cols, layout.bias_cols + cout)
                layout.bias_cols += cout
            layout.layers.append(entry)
    return layout


def build_onnx(model: fx.GraphModule, samples: int = 8, perturbations: int = 1, noise: str = "seed",
               in_shape: tuple[int, ...] | None = None, logits: bool = True) -> tuple[onnx.ModelProto, NoiseLayout]:  # fmt: skip
    """The ONNX model of a loaded qbdl INT8 model (qdnn: S = 1; QBNN: 'flipout' layers, S samples per image).

    perturbations: banked int8 perturbations kept per layer (sample s uses entry s mod K; at most the QBNN's
    bank size). noise: "seed" (an int64 `seed` input drives an in-graph counter hash) or "input" (`signs`
    [S*N, T] of +-1 and `bias_noise` [S, B] are inputs; see noise_layout). in_shape: [C, H, W] of the input.
    """
    if noise not in ("seed", "input"):
        raise ExportError(f"noise must be 'seed' or 'input', got {noise!r}")
    layout = noise_layout(model)
    bayes = bool(layout.layers)
    for m in model.modules():
        if isinstance(m, QuantLayer):
            _check_meta_layer(m)
            if m.bayesian and m.mode == "sample" and m.sampler != "flipout":
                raise ExportError(
                    f"INT8 layer {m.index} samples with {m.sampler!r}, but the ONNX export runs per-example INT8 "
                    "Flipout (constant int8 mean and perturbation weights, random signs): quantize the BNN with "
                    "sampler='flipout' (quant=flipout), or export the run directory, which re-quantizes it so"
                )
            if m.bayesian and m.mode == "sample" and perturbations > m.bank_size:
                raise ExportError(
                    f"perturbations={perturbations} exceeds the QBNN's bank of {m.bank_size} int8 perturbations "
                    f"per layer: choose 1..{m.bank_size}"
                )
    if not bayes:
        samples = 1
    if samples < 1 or perturbations < 1:
        raise ExportError(f"samples and perturbations must be >= 1, got {samples} and {perturbations}")
    g = _Graph()
    inputs, env = [], {}
    noise_obj = _Noise(g, layout, samples)
    for node in model.graph.nodes:
        if node.op == "placeholder":
            if node.name in env:
                continue
            if inputs:
                raise ExportError("the INT8 graph has more than one input; the export takes one image tensor")
            name = g.name("input")
            dims = ["N", *(in_shape or (None, None, None))]
            inputs.append(helper.make_tensor_value_info(name, F32, dims))
            env[node.name] = name
            shape = g.op("Shape", [name], "input")
            noise_obj.n = g.op("Slice", [shape, g.const("z0", np.array([0], np.int64)),
                                         g.const("o1", np.array([1], np.int64))], "input")  # fmt: skip
            rows = g.op("Mul", [noise_obj.n, g.const("S", np.array([samples], np.int64))], "input")
            if bayes and noise == "input":
                noise_obj.signs = g.name("signs")
                inputs.append(helper.make_tensor_value_info(noise_obj.signs, F32, ["SN", layout.sign_cols]))
                if layout.bias_cols:
                    noise_obj.bias_noise = g.name("bias_noise")
                    inputs.append(helper.make_tensor_value_info(noise_obj.bias_noise, F32,
                                                                [samples, layout.bias_cols]))  # fmt: skip
            elif bayes:
                seed = g.name("seed")
                inputs.append(helper.make_tensor_value_info(seed, I64, [1]))
                _hashed_noise(g, noise_obj, seed, rows, layout)
            continue
        if node.op == "output":
            out = env[node.args[0].name] if isinstance(node.args[0], fx.Node) else None
            if out is None:
                raise ExportError("the INT8 graph must return one tensor (the logits)")
            break
        args = [env.get(a.name) if isinstance(a, fx.Node) else a for a in node.args]
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            base = node.target
            if isinstance(m, Quantize):
                inv = float(torch.tensor(1.0) / torch.tensor(m.scale, dtype=torch.float32))
                y = g.op("Mul", [args[0], g.const("inv", np.float32(inv))], base)
                y = g.clip_u8(g.q(y, 1.0, m.zero_point, base), 0, m.qmax, base)
                if samples > 1:  # the S samples folded into the batch: row s * N + n
                    y = g.op("Concat", [y] * samples, f"{base}_tile", axis=0)
                env[node.name] = y
            elif isinstance(m, QuantLayer):
                if m.bayesian and m.mode == "sample":
                    entry = next(e for e in layout.layers if e["name"] == node.target)
                    env[node.name] = _flipout_layer(
                        g, m, args[0], base, noise_obj, entry, samples, perturbations
                    )
                else:
                    env[node.name] = _det_layer(g, m, args[0], base)
            elif isinstance(m, QAdd):
                (sa, za), (sb, zb) = m.inputs
                s = g.op("Add", [g.dq(args[0], sa, za, base), g.dq(args[1], sb, zb, base)], base)
                y = g.q(s, m.scale, m.zero_point, base)
                env[node.name] = g.clip_u8(y, m.zero_point if m.relu else 0, m.qmax, base)
            elif isinstance(m, QReLU):
                env[node.name] = (
                    g.clip_u8(args[0], m.inputs[0][1], 255, base) if m.inputs[0][1] > 0 else args[0]
                )
            elif isinstance(m, QAdaptiveAvgPool):
                size = m.output_size
                if size not in (1, (1, 1), [1, 1]):
                    raise ExportError(
                        f"{node.target}: adaptive pooling to {size}; the export covers output size 1"
                    )
                zp = m.inputs[0][1]
                y = g.op("GlobalAveragePool", [g.dq(args[0], 1.0, zp, base)], base)
                env[node.name] = g.q(y, 1.0, zp, base)
            elif isinstance(m, QMaxPool):
                if m.dim != 2:
                    raise ExportError(f"{node.target}: {m.dim}-D max pooling; the export covers 2-D")

                def pair(v):
                    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]

                p = pair(m.padding)
                env[node.name] = g.op("MaxPool", [args[0]], base, kernel_shape=pair(m.kernel_size),
                                      strides=pair(m.stride or m.kernel_size), pads=p + p,
                                      dilations=pair(m.dilation), ceil_mode=int(m.ceil_mode))  # fmt: skip
            elif isinstance(m, DeQuantize):
                env[node.name] = g.dq(args[0], *m.inputs[0], base)
            elif isinstance(m, torch.nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                env[node.name] = g.op("Flatten", [args[0]], base, axis=1)
            elif isinstance(m, (torch.nn.Identity, torch.nn.Dropout)):
                env[node.name] = args[0]
            else:
                raise ExportError(f"{node.target}: module {type(m).__name__} has no ONNX export here")
        elif node.op == "call_function" and node.target is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                raise ExportError(
                    f"{node.name}: torch.flatten({start}, {end}); the export covers flatten(x, 1)"
                )
            env[node.name] = g.op("Flatten", [args[0]], node.name, axis=1)
        else:
            raise ExportError(f"{node.name}: graph op {node.op} {node.target} has no ONNX export here")
    # outputs: logits [S, N, C] -> probabilities, predictive mean, entropy, mutual information
    tail = g.op("Slice", [g.op("Shape", [out], "out"), g.const("o1", np.array([1], np.int64)),
                          g.const("big", np.array([1 << 30], np.int64))], "out")  # fmt: skip
    lg = g.op("Reshape", [out, g.op("Concat", [g.const("Sm1", np.array([samples, -1], np.int64)), tail], "out",
                                    axis=0)], "out")  # fmt: skip
    p = g.op("Softmax", [lg], "out", axis=-1)
    pbar = g.op("ReduceMean", [p, g.const("ax0", np.array([0], np.int64))], "out", keepdims=0)
    tiny = g.const("tiny", np.float32(1e-30))

    def neg_plogp(v: str, axis: int, base: str) -> str:
        t = g.op("Mul", [v, g.op("Log", [g.op("Max", [v, tiny], base)], base)], base)
        return g.op("Neg", [g.op("ReduceSum", [t, g.const("axl", np.array([axis], np.int64))], base, keepdims=0)],
                    base)  # fmt: skip

    ent = neg_plogp(pbar, -1, "entropy")
    alea = g.op("ReduceMean", [neg_plogp(p, -1, "alea"), g.const("ax0", np.array([0], np.int64))], "alea",
                keepdims=0)  # fmt: skip
    mi = g.op("Max", [g.op("Sub", [ent, alea], "mi"), g.const("zerof", np.float32(0))], "mi")
    finals = [("probs", pbar, ["N", "C"]), ("entropy", ent, ["N"]), ("mi", mi, ["N"])]
    if logits:
        finals.append(("logits", lg, [samples, "N", "C"]))
    outputs = []
    for name, src, dims in finals:
        g.nodes.append(helper.make_node("Identity", [src], [name], name=g.name(f"n_out_{name}")))
        outputs.append(helper.make_tensor_value_info(name, F32, dims))
    layout.values = dict(env)
    graph = helper.make_graph(g.nodes, "qbdl", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qbdl")
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return proto, layout
