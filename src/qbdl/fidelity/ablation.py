"""The ablation model: a copy of the BNN whose weights, sampling and activations follow the QBNN."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from qbdl.fidelity.sites import (
    _AblationAdd,
    _AblationLayer,
    _AblationQuant,
    _chan,
    _int8_sample,
    _Requant,
    _Site,
)
from qbdl.quant.activations import QAdd, Quantize
from qbdl.quant.layers import QuantLayer
from qbdl.quant.prepared import ObservedAdd, ObservedQuant, PreparedLayer
from qbdl.quant.ptq import _WEIGHTED, _module, _set_module, _sole_user, _Tracer, convert, prepare

_AVG_POOLS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)
_AVG_FNS = (
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    torch.mean,
)


def _ablation_layers(model: nn.Module) -> list[_AblationLayer]:
    return [m for m in model.modules() if isinstance(m, _AblationLayer)]


def _sites(model: nn.Module) -> list[_Site]:
    return [m for m in model.modules() if isinstance(m, _Site) and not isinstance(m, _Requant)]


def _draw_hook(model: nn.Module, args) -> None:
    layers = [m for m in model._fid_layers if m.sampling and m.bayesian and m.layer_mode() == "sample"]
    if not layers:
        return
    if any(m.q.inplace_capable and m.q._sampler is None for m in layers):
        # the in-place sampler is built by the QBNN's first sampled forward: build it, leave the RNG alone
        devices = []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model._fid_qbnn(args[0].detach().cpu())
    for m in layers:  # the QBNN's order (its prefetch hook draws every layer up front, in module order)
        m._draws = _int8_sample(m.q)


def _is_avg_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _AVG_POOLS)
    if node.op == "call_function":
        return node.target in _AVG_FNS
    return node.op == "call_method" and node.target == "mean"


def _producer_site(gm: fx.GraphModule, node: fx.Node) -> _Site | None:
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node):
        mod = _module(gm, src)
        if isinstance(mod, _Site):
            return mod
        nxt = [a for a in src.args if isinstance(a, fx.Node)]
        src = nxt[0] if nxt else None
    return None


def _reaches_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when `node`'s value reaches the graph output through no other quantization site (the logits)."""
    todo, seen = list(node.users), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "output":
            return True
        if not isinstance(_module(gm, n), _Site):
            todo.extend(n.users)
    return False


def _check_qbnn(qbnn: nn.Module) -> nn.Module:
    if any(isinstance(m, PreparedLayer) for m in qbnn.modules()):  # a calibrated prepared model
        qbnn = convert(qbnn)
    layers = [m for m in qbnn.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("error budget: the second model is neither a converted QBNN nor a prepared model")
    bad = sorted({m.sampler for m in layers if m.bayesian and m.sampler not in ("fresh", "bank")})
    if bad:
        raise NotImplementedError(
            f"error budget: QBNN sampler {bad} is not supported (per-example INT8 Flipout has no shared weight "
            "sample to compare); convert with sampler='fresh' or 'bank'"
        )
    return qbnn


def ablation_model(bnn: nn.Module, qbnn: nn.Module) -> fx.GraphModule:
    """An FP32 copy of `bnn` whose quantization parts (PARTS) follow `qbnn` and switch on separately.

    `qbnn`: the converted INT8 model of this BNN (fresh or bank sampling; the ablation reads its int8 weights,
    its samples and its calibrated qparams, so it is shared, not copied) or a calibrated prepared model
    (converted here). Switch parts with :func:`set_parts`; run it like the BNN (mc_logits with a seed).
    """
    qbnn = _check_qbnn(qbnn)
    ref = copy.deepcopy(bnn).cpu().eval()
    gm = prepare(ref, backend=None)  # the graph (BN folded, ReLU fused) the QBNN was converted from
    traced = _Tracer().trace(ref)
    bn_of: dict[str, nn.Module] = {}
    for node in traced.nodes:
        if node.op == "call_module" and isinstance(ref.get_submodule(node.target), _WEIGHTED):
            user = _sole_user(node)
            if user is not None and user.op == "call_module":
                m = ref.get_submodule(user.target)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    bn_of[node.target] = m
    qmods = dict(qbnn.named_modules())
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if not isinstance(mod, (PreparedLayer, ObservedQuant, ObservedAdd)):
            continue
        q = qmods.get(node.target)
        want = {PreparedLayer: QuantLayer, ObservedQuant: Quantize, ObservedAdd: QAdd}[type(mod)]
        if not isinstance(q, want):
            raise ValueError(
                f"{node.target}: the QBNN has {type(q).__name__ if q is not None else 'nothing'} here, expected "
                f"{want.__name__}: it was not converted from this BNN's graph"
            )
        if isinstance(mod, PreparedLayer):
            new = _AblationLayer(node.target, ref.get_submodule(node.target), bn_of.get(node.target), mod, q)
        elif isinstance(mod, ObservedQuant):
            new = _AblationQuant(node.target, q)
        else:
            new = _AblationAdd(node.target, mod.relu, q)
        _set_module(gm, node.target, new)
    n_pool = 0
    for node in list(gm.graph.nodes):
        if _is_avg_pool(gm, node):
            src = _producer_site(gm, node)
            if src is None:
                continue
            name = f"requant_pool_{n_pool}"
            n_pool += 1
            gm.add_submodule(name, _Requant(name, src))
            with gm.graph.inserting_after(node):
                rq = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(rq)
            rq.args = (node,)
    gm.graph.lint()
    gm.recompile()
    graph_order = []
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if isinstance(mod, _AblationLayer):
            graph_order.append(mod.site_name)
            src = _module(gm, node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            # what an FP32 layer leaves unquantized: the network input it reads, the logits it writes;
            # the site is held as a plain reference, not as a second parent of it in the module tree
            object.__setattr__(mod, "input_site", src if type(src) is _AblationQuant else None)
            mod.feeds_output = _reaches_output(gm, node)
    gm._fid_graph_order = graph_order
    order = {id(m): i for i, m in enumerate(qbnn.modules())}
    gm._fid_layers = sorted(_ablation_layers(gm), key=lambda m: order[id(m.q)])
    object.__setattr__(gm, "_fid_qbnn", qbnn)  # not a submodule: its layers already are
    gm.register_forward_pre_hook(_draw_hook)
    for m in gm._fid_layers:
        err = (m.mu_fold - m.mu_deq).abs() / _chan(m.q.mu_scale, m.mu_fold.dim())
        if float(err.max()) > 0.5 + 1e-3:
            raise ValueError(
                f"{m.site_name}: the QBNN's int8 mu is {float(err.max()):.1f} LSB from the BNN's folded mu: "
                "it was quantized from other weights"
            )
    return gm.eval()


def set_parts(
    model: nn.Module,
    weights: bool = False,
    sampling: bool = False,
    activations: bool = False,
    fp32: Iterable[str] = (),
    exact_sigma: bool = False,
) -> nn.Module:
    """Switch the quantization parts of an ablation model (all False: the FP32 BNN; all True: the QBNN).

    fp32: layers kept at FP32 as a mixed-precision engine would run them: their weights and sampling are the
    BNN's, the network input they read is not quantized, nor are the logits they write; an activation they
    hand to an INT8 layer still is. exact_sigma: with `weights` alone, sample around the int8 mu with the
    BNN's sigma instead of sigma's int8 grid (the FP32 Gaussian sampling path only).
    """
    fp32 = set(fp32)
    layers = _ablation_layers(model)
    unknown = fp32 - {m.site_name for m in layers}
    if unknown:
        raise ValueError(
            f"fp32 layers {sorted(unknown)} are not quantized layers of this model "
            f"(it has {getattr(model, '_fid_graph_order', [m.site_name for m in layers])})"
        )
    for m in model.modules():
        if isinstance(m, _Site):
            m.activations = bool(activations)
    for m in layers:
        on = m.site_name not in fp32
        m.weights, m.sampling = bool(weights) and on, bool(sampling) and on
        m.exact_sigma = bool(exact_sigma)
        if not on:
            if m.feeds_output:
                m.activations = False
            if m.input_site is not None:
                m.input_site.activations = False
    return model


class _collect:
    """Context: accumulate the pre-quantization statistics of every site into `sink`."""

    def __init__(self, model: nn.Module, sink: dict) -> None:
        self.sites, self.sink = _sites(model), sink

    def __enter__(self) -> dict:
        for s in self.sites:
            s.stats = self.sink
        return self.sink

    def __exit__(self, *exc) -> None:
        for s in self.sites:
            s.stats = None
