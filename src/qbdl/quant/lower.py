"""Lower a converted graph to plain-integer ops and wire each module's input qparams from its producer.

Between Quantize and DeQuantize every value is a uint8 tensor whose scale and zero point are fixed by
calibration, so they are known per graph edge before anything runs: this pass propagates them through the
graph (through shape ops and max pooling, which keep them), hands them to the modules that read activations,
and replaces the few float ops that meet a uint8 activation (ReLU, adaptive average pooling) by integer
versions. It runs after convert() and after load_qbnn(), so files of format 1 (no input zero points, float
pooling modules) get the same graph.
"""

from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .activations import DeQuantize, QAdaptiveAvgPool, QAdd, QMaxPool, QReLU, Quantize, Wired
from .layers import QuantLayer

_KEEP_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_KEEP_FUNCTIONS = (torch.flatten, torch.reshape, torch.cat, operator.getitem)
_MAX_POOLS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_KEEP_METHODS = ("view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze")
_META_METHODS = ("size", "dim")  # return ints, not activations
_RELU_FUNCTIONS = (F.relu, torch.relu)
_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)


def _replace(gm: fx.GraphModule, node: fx.Node, module: nn.Module, qp: dict, n: list[int]) -> None:
    """Put `module` (an integer op keeping its input's grid) in place of `node`, reading node's first input."""
    src = node.args[0]
    name = f"int8_{type(module).__name__.lower()}_{n[0]}"
    n[0] += 1
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (src,))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if isinstance(module, Wired):
        module.inputs = [qp[src]]
    qp[new] = qp[src]


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """Wire input qparams into every activation reader and make every op on a uint8 activation integer (in place)."""
    qp: dict[fx.Node, tuple[float, int] | None] = {}
    counter = [0]
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            qp[node] = None
            continue
        ins = [qp.get(a) for a in node.all_input_nodes]
        quant_in = [p for p in ins if p is not None]
        if node.op == "output":
            if quant_in:
                raise ValueError(
                    "the INT8 graph returns a uint8 activation: its outputs must pass a DeQuantize"
                )
            continue
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        src = node.args[0] if node.args else None
        if isinstance(mod, Quantize):
            qp[node] = (mod.scale, mod.zero_point)
        elif isinstance(mod, QMaxPool):
            qp[node] = qp[src]
        elif isinstance(mod, (QuantLayer, QAdd, DeQuantize, QReLU, QAdaptiveAvgPool)):
            n_in = 2 if isinstance(mod, QAdd) else 1
            got = [qp.get(a) if isinstance(a, fx.Node) else None for a in node.args[:n_in]]
            if any(g is None for g in got):
                raise ValueError(
                    f"{node.target}: its input is not a quantized activation (no Quantize before it)"
                )
            if isinstance(mod, QuantLayer):
                mod.set_input_qparams(*got[0])
                qp[node] = (mod.out_scale, mod.out_zp)
            elif isinstance(mod, QAdd):
                mod.inputs, qp[node] = got, (mod.scale, mod.zero_point)
            else:  # DeQuantize ends the integer region; QReLU and pooling keep their input's grid
                mod.inputs, qp[node] = got, None if isinstance(mod, DeQuantize) else got[0]
        elif not quant_in:
            qp[node] = None  # the float part of the graph
        elif (
            node.op == "call_method"
            and node.target in _META_METHODS
            or (node.op == "call_function" and node.target is builtins.getattr)
        ):
            qp[node] = None
        elif (
            isinstance(mod, nn.ReLU)
            or (node.op == "call_function" and node.target in _RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_"))
        ):
            _replace(gm, node, QReLU(), qp, counter)
        elif isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)) or (
            node.op == "call_function" and node.target in _POOL_FUNCTIONS
        ):
            size = (
                mod.output_size
                if mod is not None
                else (node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])
            )
            _replace(gm, node, QAdaptiveAvgPool(size), qp, counter)
        elif type(mod) in _MAX_POOLS:
            if mod.return_indices:
                raise NotImplementedError(
                    f"{node.target}: max pooling with return_indices is not quantizable"
                )
            args = (mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)
            _replace(gm, node, QMaxPool(_MAX_POOLS[type(mod)], *args), qp, counter)
        elif (
            isinstance(mod, _KEEP_MODULES)
            or (node.op == "call_function" and node.target in _KEEP_FUNCTIONS)
            or (node.op == "call_method" and node.target in _KEEP_METHODS)
        ):
            if len(set(quant_in)) > 1:
                raise NotImplementedError(
                    f"{node.name}: {node.target} joins uint8 activations on different grids {sorted(set(quant_in))} "
                    "(scale, zero point); the INT8 graph joins only activations of one grid. Quantize the "
                    "network up to before this op (its output dequantized) and run the rest in FP32"
                )
            qp[node] = quant_in[0]
        else:
            what = (
                type(mod).__name__ if mod is not None else getattr(node.target, "__name__", str(node.target))
            )
            raise NotImplementedError(
                f"{node.name}: {what} meets a uint8 activation in the INT8 graph, where only conv/linear (+BN, "
                "ReLU), residual adds, ReLU, max pooling (nn.MaxPool*), adaptive average pooling and shape ops "
                "run on integers. Quantize the network up to before this op (its output dequantized) and run "
                "the rest in FP32, or replace the op by one of those"
            )
    gm.graph.lint()
    check_widths(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _flat_width(gm: fx.GraphModule, node: fx.Node, width: dict) -> int | None:
    """Features after flattening `node`'s input from dim 1: channels x the pooled size, where both are known."""
    src = node.args[0] if node.args else None
    c = width.get(src)
    while isinstance(src, fx.Node) and src.op == "call_module":
        mod = gm.get_submodule(src.target)
        if isinstance(mod, (QAdaptiveAvgPool, nn.AdaptiveAvgPool2d)):
            size = mod.output_size
            sizes = [size] * 2 if isinstance(size, int) else list(size)
            if c is None or any(not isinstance(v, int) for v in sizes):
                return None
            return c * int(torch.tensor(sizes).prod())
        if not isinstance(mod, (DeQuantize, QReLU, nn.Identity)):
            return None
        src = src.args[0]
    return None


def check_widths(gm: fx.GraphModule) -> None:
    """Channels along the graph's edges: each INT8 layer reads as many as its producer writes (else ValueError).

    A model file whose layers do not fit together (a tensor of another shape, a changed pooling size) is
    refused here, at load, instead of failing inside a oneDNN kernel at prediction time.
    """
    width: dict[fx.Node, int | None] = {}
    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        w = width.get(src)
        if isinstance(mod, QuantLayer):
            need = mod.mu_q.shape[1] * (int(mod.config.get("groups", 1)) if mod.kind != "linear" else 1)
            got = w
            if mod.kind == "linear" and got is None and src is not None:
                got = _flat_width(gm, src, width) if _is_flatten(gm, src) else None
            if got is not None and got != need:
                raise ValueError(
                    f"INT8 layer {node.target} reads {need} {'features' if mod.kind == 'linear' else 'channels'} "
                    f"but the graph feeds it {got}: the model's layers do not fit together (a corrupt or "
                    "hand-edited model file). Re-create it with qbdl.quant.save_qbnn"
                )
            width[node] = int(mod.mu_q.shape[0]) if mod.kind != "linear" else None
        elif isinstance(mod, QAdd):
            a, b = (width.get(x) for x in node.args[:2])
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"residual add {node.target} joins activations of {a} and {b} channels: the model's layers "
                    "do not fit together (a corrupt or hand-edited model file). Re-create it with qbdl.quant.save_qbnn"
                )
            width[node] = a if a is not None else b
        elif isinstance(
            mod, (QReLU, QMaxPool, QAdaptiveAvgPool, DeQuantize, Quantize, nn.Identity, nn.ReLU)
        ) or (
            mod is None and node.op == "call_function" and node.target in (*_RELU_FUNCTIONS, *_POOL_FUNCTIONS)
        ):
            width[node] = w
        else:
            width[node] = None


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """`node` flattens from dim 1 (torch.flatten(x, 1), x.flatten(1) or nn.Flatten())."""
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    elif node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Flatten):
        start = gm.get_submodule(node.target).start_dim
    else:
        return False
    return start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs
