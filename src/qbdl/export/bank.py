"""A QBNN with qbdl's 'bank' sampler in standard ONNX operators: K constant-weight INT8 networks, one per row.

Entry k of the bank is the network whose sampled layers all use their k-th int8 weight sample (and bias sample),
quantized once: what qbdl's engine computes for MC sample s with entry s mod K (`mc_logits`). In the graph each
entry is a copy of the deterministic INT8 network with those constant weights (QDQ groups that ONNX Runtime runs
as QLinearConv with pre-packed weights, OpenVINO as INT8 kernels), so a sample costs what the deterministic
network costs. The S*N rows (sample s of image n: row s * N + n) are sorted by their entry (TopK), split into K
chunks, chunk k runs through network k (inside an If that skips an empty chunk: OpenVINO cannot run a batch of
0), and the rows go back to their order (Gather). Image n's samples use entries (o_n + s) mod K, o_n drawn per
image and call, so S <= K samples of an image are S distinct networks, as in qbdl's engine.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto, helper

from qbdl.quant.layers import QuantLayer
from qbdl.quant.samplers import BankSampler

from .qdq import F32, I64, ExportError, Graph, channel_bias, int8_float_bias, int8_kernel, requant_fma


def bank_samples(q: QuantLayer) -> list[tuple]:
    """The layer's K (int8 weight, float bias or None) samples, in qbdl's units (scale w_scale; real-valued bias)."""
    impl = q.impl
    if not isinstance(impl, BankSampler):
        raise ExportError(f"INT8 layer {q.index} samples with {q.sampler!r}; this part exports 'bank' layers")
    return [impl.weight(q, k) for k in range(q.bank_size)]


def entry_kernel(g: Graph, q: QuantLayer, x: str, w, b, exact: bool, base: str) -> str:
    """Q(relu(conv(x, w) + b)) of one bank sample, clamped to qmax: qbdl's oneDNN kernel on that sample."""
    if exact:  # the float bias on the exact accumulator, oneDNN's fused multiply-add requantization
        bias = None if b is None else channel_bias(g, q, b, base)
        y = int8_float_bias(g, q, x, w, q.w_scale, q.in_scale, q.in_zp, bias, base)
        if q.relu:
            y = g.op("Relu", [y], base)
        y = requant_fma(g, y, q.out_scale, q.out_zp, base)
    else:  # the bias rounded onto the accumulator's grid: one QLinearConv with a pre-packed weight
        bias = None
        if b is not None:
            unit = q.in_scale * q.w_scale.double()
            bq = (b.double() / unit).round().clamp(-(2**31), 2**31 - 1).numpy()
            bias = g.bias(bq, unit.numpy(), base)
        y = int8_kernel(g, q, x, w, q.w_scale, q.in_scale, q.in_zp, bias, base)
        if q.relu:
            y = g.op("Relu", [y], base)
        y = g.q(y, q.out_scale, q.out_zp, base)
    return g.clip_u8(y, 0, q.qmax, base)


def bank_network(g: Graph, x: str, entries: str, samples: int, size: int, walk: Callable, classes: int,
                 in_shape: tuple[int, ...] | None) -> str:  # fmt: skip
    """Float logits [S*N, C] of the float input `x` [N, ...]: row s * N + n through network entries[row]."""
    xs = g.op("Concat", [x] * samples, "bank_tile", axis=0) if samples > 1 else x
    if size == 1:
        return walk(g, xs, 1, 0)
    rows = g.op("Shape", [entries], "bank")
    _, perm = g.op("TopK", [g.op("Cast", [entries], "bank", to=F32), rows], "bank", n_out=2, axis=0, largest=0,
                   sorted=1)  # fmt: skip
    counts = [g.op("ReduceSum", [g.op("Cast", [g.op("Equal", [entries, g.const("k64", np.array(k, np.int64))],
                                                    "bank")], "bank", to=I64)], "bank", keepdims=1)
              for k in range(size)]  # fmt: skip
    chunks = g.op(
        "Split", [g.op("Gather", [xs, perm], "bank", axis=0), g.op("Concat", counts, "bank", axis=0)], "bank",
        n_out=size, axis=0,
    )  # fmt: skip
    ys = []
    for k, chunk in enumerate(chunks):
        sub = Graph(names=g.names)  # the network's nodes and constant weights live inside its branch
        # static ranks at the branch's borders: OpenVINO's CPU plugin refuses an If of dynamic rank
        xin = chunk if in_shape is None else sub.op("Reshape", [chunk, sub.const("in_shape", np.array(
            [-1, *in_shape], np.int64))], f"bank_net{k}")  # fmt: skip
        y = walk(sub, xin, 1, k)
        y = sub.op("Reshape", [y, sub.const("out_shape", np.array([-1, classes], np.int64))], f"bank_net{k}")
        # its constants in the main graph: ONNX Runtime keeps a branch's own initializers beside their pre-packed
        # copies (ResNet-50, K = 4: 358 MiB resident instead of 217), and pre-packs outer-scope ones as well
        g.inits.extend(sub.inits)
        then = helper.make_graph(sub.nodes, g.name(f"bank_net{k}"), [], [helper.make_tensor_value_info(
            y, F32, [None, classes])])  # fmt: skip
        empty = Graph(names=g.names)  # [0, C] (OpenVINO reads a Constant of no elements as a scalar)
        e = empty.op("ConstantOfShape", [empty.const("empty_shape", np.array([0, classes], np.int64))],
                     f"bank_none{k}", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))  # fmt: skip
        other = helper.make_graph(empty.nodes, g.name(f"bank_none{k}"), [], [helper.make_tensor_value_info(
            e, F32, [0, classes])], empty.inits)  # fmt: skip
        ok = g.op("Greater", [counts[k], g.const("zero64v", np.array([0], np.int64))], "bank")
        ok = g.op("Squeeze", [ok, g.const("ax0", np.array([0], np.int64))], "bank")
        ys.append(g.op("If", [ok], f"bank_net{k}", then_branch=then, else_branch=other))
    _, inv = g.op("TopK", [g.op("Cast", [perm], "bank", to=F32), rows], "bank", n_out=2, axis=0, largest=0,
                  sorted=1)  # fmt: skip
    return g.op("Gather", [g.op("Concat", ys, "bank", axis=0), inv], "bank", axis=0)
