"""A qbdl INT8 graph (qdnn, or a QBNN with sampler 'flipout') as an ONNX model in standard operators only.

Every deterministic conv / linear is QDQ (qdq.py): DequantizeLinear of a uint8 activation and of a constant int8
weight (per output channel), Conv / Gemm, QuantizeLinear, so ONNX Runtime and OpenVINO run it as an INT8 kernel
with constant weights. A QBNN layer is per-example INT8 Flipout exactly as qbdl's 'flipout' sampler computes it
(flipout.py), with the S Monte Carlo samples folded into the batch (row s * N + n), so one session run gives
every sample of every image. Outputs: `probs` (the predictive mean [N, C]), `entropy`, `mi` (mutual
information, >= 0) and `logits` [S, N, C].
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper
from torch import fx

from qbdl.quant.activations import DeQuantize, QAdaptiveAvgPool, QAdd, QMaxPool, QReLU, Quantize
from qbdl.quant.layers import QuantLayer

from .bank import bank_network, bank_samples, entry_kernel
from .flipout import HASH_P, Noise, NoiseLayout, flipout_layer, hashed_noise, noise_layout
from .qdq import F32, I64, OPSET, ExportError, Graph, det_layer, qadd

__all__ = ["HASH_P", "OPSET", "ExportError", "NoiseLayout", "build_onnx", "noise_layout"]


def _check_meta_layer(q: QuantLayer) -> None:
    if q.in_zp is None:
        raise ExportError(
            f"INT8 layer {q.index} has no input zero point: load the model with qbdl.quant.load_qbnn"
        )


class _Walk:
    """Emits qbdl's INT8 graph from a float input: into the main graph, or (bank) one network per entry."""

    def __init__(self, model: fx.GraphModule, noise: Noise, perturbations: int, exact: bool, bayes: bool) -> None:
        self.model, self.noise, self.perturbations, self.exact, self.bayes = model, noise, perturbations, exact, bayes
        self.env: dict[str, str] = {}
        self.bank: dict[str, list] = {}  # a bank layer's K samples, drawn once for the K networks

    def __call__(self, g: Graph, x: str, samples: int, entry: int | None = None) -> str:
        """The float logits of `x`; samples > 1 tiles the quantized input (row s * N + n); entry: the bank's."""
        model, noise_obj, exact = self.model, self.noise, self.exact
        layout = noise_obj.layout
        env = self.env = {}
        for node in model.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = x
                continue
            if node.op == "output":
                out = env[node.args[0].name] if isinstance(node.args[0], fx.Node) else None
                if out is None:
                    raise ExportError("the INT8 graph must return one tensor (the logits)")
                return out
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
                    if m.bayesian and m.mode == "sample" and m.sampler == "bank":
                        if node.target not in self.bank:
                            self.bank[node.target] = bank_samples(m)
                        env[node.name] = entry_kernel(g, m, args[0], *self.bank[node.target][entry], exact, base)
                    elif m.bayesian and m.mode == "sample":
                        e = next(e for e in layout.layers if e["name"] == node.target)
                        env[node.name] = flipout_layer(g, m, args[0], base, noise_obj, e, samples, self.perturbations,
                                                       exact)  # fmt: skip
                    else:
                        env[node.name] = det_layer(g, m, args[0], base)
                elif isinstance(m, QAdd):
                    env[node.name] = qadd(g, m.inputs, m.scale, m.zero_point, m.relu, m.qmax, args[0], args[1], base,
                                          exact=exact and self.bayes)  # fmt: skip
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
        raise ExportError("the INT8 graph has no output")


def build_onnx(model: fx.GraphModule, samples: int = 8, perturbations: int = 1, noise: str = "seed",
               in_shape: tuple[int, ...] | None = None, logits: bool = True,
               exact: bool = True) -> tuple[onnx.ModelProto, NoiseLayout]:  # fmt: skip
    """The ONNX model of a loaded qbdl INT8 model (qdnn: S = 1; QBNN: S samples per image).

    A QBNN with sampler 'flipout' runs per-example INT8 Flipout (flipout.py); one with 'bank' runs as K constant
    INT8 networks, each row (sample s of image n: row s * N + n) through one (bank.py). perturbations: Flipout's
    banked int8 perturbations kept per layer (sample s uses entry s mod K; at most the QBNN's bank size). noise:
    "seed" (an int64 `seed` input drives an in-graph counter hash) or "input" (`signs` [S*N, T] of +-1 and
    `bias_noise` [S, B] for Flipout, `entries` [S*N] of 0..K-1 for a bank, are inputs; see noise_layout).
    in_shape: [C, H, W] of the input.
    exact: the sampled layers add qbdl's float biases to the exact int32 accumulators (ConvInteger; equal to
    qbdl's engine up to float rounding) rather than run as QLinearConv groups (bias rounded onto the
    accumulator grid: each layer within an LSB, drifting over a deep network); see flipout.py.
    """
    if noise not in ("seed", "input"):
        raise ExportError(f"noise must be 'seed' or 'input', got {noise!r}")
    layout = noise_layout(model)
    bayes = bool(layout.layers or layout.bank)
    for m in model.modules():
        if isinstance(m, QuantLayer):
            _check_meta_layer(m)
            if m.bayesian and m.mode == "sample" and m.sampler not in ("flipout", "bank"):
                raise ExportError(
                    f"INT8 layer {m.index} samples with {m.sampler!r}, but the ONNX export runs per-example INT8 "
                    "Flipout or a bank of constant int8 samples: quantize the BNN with sampler='flipout' or "
                    "'bank' (quant=flipout / quant.sampler=bank), or export the run directory, which "
                    "re-quantizes it so"
                )
            if m.bayesian and m.mode == "sample" and m.sampler == "bank" and not 1 <= m.bank_size < HASH_P:
                raise ExportError(f"INT8 layer {m.index}: a bank of {m.bank_size}; the export takes 1..{HASH_P - 1}")
            if m.bayesian and m.mode == "sample" and m.sampler == "bank" and m.bank_size != layout.bank_size:
                raise ExportError(
                    f"INT8 layer {m.index}: a bank of {m.bank_size}, another layer's {layout.bank_size}; the export "
                    "runs entry k of every layer as one network: quantize with one bank_size"
                )
            if m.bayesian and m.mode == "sample" and m.sampler == "flipout" and perturbations > m.bank_size:
                raise ExportError(
                    f"perturbations={perturbations} exceeds the QBNN's bank of {m.bank_size} int8 perturbations "
                    f"per layer: choose 1..{m.bank_size}"
                )
    if layout.bank and layout.layers:
        raise ExportError(
            "the QBNN mixes 'bank' and 'flipout' layers; the export runs one or the other: re-quantize with one sampler"
        )
    if not bayes:
        samples = 1
    if samples < 1 or perturbations < 1:
        raise ExportError(f"samples and perturbations must be >= 1, got {samples} and {perturbations}")
    g = Graph()
    noise_obj = Noise(g, layout, samples)
    placeholders = [n for n in model.graph.nodes if n.op == "placeholder"]
    if len({n.name for n in placeholders}) != 1:
        raise ExportError("the INT8 graph has more than one input; the export takes one image tensor")
    name = g.name("input")
    inputs = [helper.make_tensor_value_info(name, F32, ["N", *(in_shape or (None, None, None))])]
    shape = g.op("Shape", [name], "input")
    noise_obj.n = g.op("Slice", [shape, g.const("z0", np.array([0], np.int64)),
                                 g.const("o1", np.array([1], np.int64))], "input")  # fmt: skip
    rows = g.op("Mul", [noise_obj.n, g.const("S", np.array([samples], np.int64))], "input")
    if bayes and noise == "input":
        if layout.layers:
            noise_obj.signs = g.name("signs")
            inputs.append(helper.make_tensor_value_info(noise_obj.signs, F32, ["SN", layout.sign_cols]))
        if layout.bank:
            noise_obj.entries = g.name("entries")
            inputs.append(helper.make_tensor_value_info(noise_obj.entries, I64, ["SN"]))
        if layout.bias_cols:
            noise_obj.bias_noise = g.name("bias_noise")
            inputs.append(helper.make_tensor_value_info(noise_obj.bias_noise, F32, [samples, layout.bias_cols]))
    elif bayes:
        seed = g.name("seed")
        inputs.append(helper.make_tensor_value_info(seed, I64, [1]))
        hashed_noise(g, noise_obj, seed, rows, layout)
    walk = _Walk(model, noise_obj, perturbations, exact, bayes)
    if layout.bank:  # a bank of K networks: each row (sample s of image n) through the one its entry names
        last = [model.get_submodule(n.target) for n in model.graph.nodes if n.op == "call_module"]
        classes = int(next(m for m in reversed(last) if isinstance(m, QuantLayer)).mu_q.shape[0])
        out = bank_network(g, name, noise_obj.entries, samples, layout.bank_size, walk, classes, in_shape)
    else:
        out = walk(g, name, samples)
        layout.values = dict(walk.env)
    # outputs: logits [S, N, C] -> probabilities, predictive mean, entropy, mutual information
    if layout.bank:  # a static class count: OpenVINO cannot infer the rank through the If branches
        lg = g.op("Reshape", [out, g.const("SmC", np.array([samples, -1, classes], np.int64))], "out")
    else:
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
    graph = helper.make_graph(g.nodes, "qbdl", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qbdl")
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    return proto, layout
