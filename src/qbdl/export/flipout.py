"""Per-example INT8 Flipout in standard ONNX operators: the random signs and bias noise, and one Flipout layer.

A QBNN layer is qbdl's 'flipout' sampler (quant/samplers.py, FlipoutSampler.forward) on S*N rows:

    y1 = Q(acc(x, mu) * u_mu + b)                 the mean term, uint8 at (mean_scale, mean_zp)
    xf = Q(s_in * (x - zp) / 2)                   sign-flipped input, uint8 at (2 * in_scale, (qmax + 1) // 2)
    y2 = Q(acc(xf, delta_k) * u_d + b_noise)      the perturbation term, uint8 at (pert_scale, 128)
    y  = Q(ka * (y1 - mean_zp) + s_out * kb * (y2 - 128))   (+ ReLU, clamp to 0..qmax)

acc the exact int32 accumulator (ConvInteger / MatMulInteger) and u the float32 product of input and weight
scales: qbdl's oneDNN kernels add their float bias (b in units of input scale x sample scale, off the mean
weight's grid; the bias noise) to that scaled accumulator before requantizing (qdq.int8_float_bias). With
`exact=False` both terms run as QDQ groups instead (ONNX Runtime's QLinearConv), the mean term's bias rounded onto
its accumulator grid and the bias noise added to a float conv: faster, within an LSB per layer but not equal. The signs s_in / s_out (per example and channel) and the bias noise are
slices of `signs` [S*N, T] / `bias_noise` [S, B]: graph inputs (qbdl's own draws: export.reference) or made
from a `seed` input by a counter hash exact in int32 and in float32 arithmetic (no RandomNormal/RandomUniform,
whose seeding differs between runtimes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import fx

from qbdl.quant.layers import QuantLayer
from qbdl.quant.samplers import FlipoutSampler

from .qdq import (
    F32,
    F64,
    I32,
    I64,
    ExportError,
    Graph,
    bias_scale,
    channel_bias,
    det_bias,
    int8_float_bias,
    int8_kernel,
    requant_fma,
)

# The counter hash: a prime whose square fits float32's 24-bit mantissa, so every product stays exact whether a
# runtime computes int32 element-wise ops in integers or in float32 (OpenVINO's CPU plugin may do either).
HASH_P = 4093
_HASH_A = (2039, 3001, 1021)


@dataclass
class NoiseLayout:
    """Where each Flipout layer's signs and bias noise sit in the `signs` [S*N, T] / `bias_noise` [S, B] inputs."""

    sign_cols: int = 0
    bias_cols: int = 0
    layers: list[dict] = field(
        default_factory=list
    )  # {"name", "s_in": (a, b), "s_out": (a, b), "bias": (a, b)|None}
    bank: list[dict] = field(default_factory=list)  # 'bank' layers: {"name", "size"}
    values: dict[str, str] = field(
        default_factory=dict
    )  # qbdl graph node -> its ONNX value (uint8 activations)

    @property
    def bank_size(self) -> int:
        """K of the 'bank' layers (one for all: entry k is a whole network)."""
        return self.bank[0]["size"] if self.bank else 0


def noise_layout(model: fx.GraphModule) -> NoiseLayout:
    """The columns of each Flipout layer in `signs` (s_in then s_out) and `bias_noise`, and the 'bank' layers, in
    graph order."""
    layout = NoiseLayout()
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        q = model.get_submodule(node.target)
        if isinstance(q, QuantLayer) and q.bayesian and q.mode == "sample" and q.sampler == "bank":
            layout.bank.append({"name": node.target, "size": int(q.bank_size)})
        elif isinstance(q, QuantLayer) and q.bayesian and q.mode == "sample":
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


class Noise:
    """The per-layer signs and bias noise: slices of the `signs` / `bias_noise` tensors (inputs or hashed)."""

    def __init__(self, g: Graph, layout: NoiseLayout, samples: int) -> None:
        self.g, self.layout, self.samples = g, layout, samples
        self.signs: str | None = None  # float32 [S*N, T] of +-1
        self.bias_noise: str | None = None  # float32 [S, B]
        self.entries: str | None = None  # int64 [S*N]: each row's bank entry (network)
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
    g: Graph, r: tuple[str, str], j: tuple[str, str], seed: tuple[str, str], salt: int, base: str
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


def hashed_noise(g: Graph, noise: Noise, seed: str, rows: str, layout: NoiseLayout) -> None:
    """signs [S*N, T], bias noise [S, B] and bank entries [S*N] from the seed: a hash of (row, column, seed)."""
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
    if layout.bank:  # image n's samples: entries (o_n + s) mod K, o_n = hash mod K (K < HASH_P)
        h = _hash(g, row_digits(noise.n, "entries"), col_digits(1, "entries"), (s0, s1), 6, "entries")  # [N, 1]
        h = g.op("Reshape", [h, g.const("row1", np.array([1, -1], np.int64))], "entries")
        s_col = g.const("entries_s", np.arange(noise.samples, dtype=np.int32)[:, None], share=False)
        h = g.op("Mod", [g.op("Add", [h, s_col], "entries"), g.const("entries_k", np.array(layout.bank_size,
                                                                                         np.int32))], "entries", fmod=0)  # fmt: skip
        h = g.op("Reshape", [h, g.const("flat", np.array([-1], np.int64))], "entries")
        noise.entries = g.op("Cast", [h], "entries", to=I64)
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


def flipout_layer(g: Graph, q: QuantLayer, x: str, base: str, noise: Noise, entry: dict, samples: int,
                  perturbations: int, exact: bool = True) -> str:  # fmt: skip
    """qbdl's FlipoutSampler.forward on S*N rows: mean term, sign-flipped perturbation term, signed add."""
    impl = q.impl
    if not isinstance(impl, FlipoutSampler):
        raise ExportError(
            f"INT8 layer {q.index} samples with {q.sampler!r}; the export runs 'flipout' layers"
        )
    c = q.config
    ms, mz, ps = float(c["mean_scale"]), int(c["mean_zp"]), float(c["pert_scale"])
    fz = FlipoutSampler.flip_zp(q)
    if exact:  # mean term: qbdl's float bias (units of in_scale * S) on the exact accumulator
        b = (
            None
            if q.bias_q is None
            else channel_bias(g, q, q.bias_q.float() * bias_scale(q).float(), f"{base}_mu")
        )
        y1 = int8_float_bias(g, q, x, q.mu_q, q.mu_scale, q.in_scale, q.in_zp, b, f"{base}_mu")
        y1 = requant_fma(g, y1, ms, mz, f"{base}_mu")
    else:  # the bias re-rounded onto mu's accumulator grid (QLinearConv's)
        y1 = int8_kernel(
            g, q, x, q.mu_q, q.mu_scale, q.in_scale, q.in_zp, det_bias(g, q, f"{base}_mu"), f"{base}_mu"
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
        bias_noise = g.op("Mul", [e, g.const(f"{base}_bsc", bias_scale(q).float().numpy(), share=False)],
                          f"{base}_eps")  # fmt: skip
    k_used = min(perturbations, samples)

    kernel = int8_float_bias if exact else int8_kernel

    def pert(xs: str, k: int, nb: str) -> str:
        return kernel(g, q, xs, impl.pert_q[k], impl.w_scale, 2 * q.in_scale, fz, None, nb)

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
    y2 = requant_fma(g, y2, ps, 128, f"{base}_pert") if exact else g.q(y2, ps, 128, f"{base}_pert")
    # signed add: rint(ka * (y1 - mz) + s_out * kb * (y2 - 128)) + out_zp, as qbdl's signed_add computes it in
    # float32, whose compiled loop fuses the first product into a multiply-add (exact: float64, rounded once)
    ka, kb = float(np.float32(ms / q.out_scale)), float(np.float32(ps / q.out_scale))
    b = g.op("Mul", [g.dq(y2, kb, 128, f"{base}_add"), s_out], f"{base}_add")
    if exact:
        a = g.op("Mul", [g.op("Cast", [g.dq(y1, 1.0, mz, f"{base}_add")], f"{base}_add", to=F64),
                         g.const("ka64", np.float64(ka), share=False)], f"{base}_add")  # fmt: skip
        t = g.op("Add", [a, g.op("Cast", [b], f"{base}_add", to=F64)], f"{base}_add")
        t = g.op("Cast", [t], f"{base}_add", to=F32)
    else:
        t = g.op("Add", [g.dq(y1, ka, mz, f"{base}_add"), b], f"{base}_add")
    y = g.q(t, 1.0, q.out_zp, f"{base}_add")
    return g.clip_u8(y, q.out_zp if q.relu else 0, q.qmax, f"{base}_add")
