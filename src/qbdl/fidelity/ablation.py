"""The ablation model: a copy of the BNN whose weights, sampling and activations follow the QBNN."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from qbdl.fidelity.sites import (
    AblationAdd,
    AblationLayer,
    AblationQuant,
    Requant,
    Site,
    channel_view,
    int8_sample,
)
from qbdl.quant.activations import QAdd, Quantize
from qbdl.quant.contract import sampler_class, sampler_names
from qbdl.quant.fold import BATCH_NORMS
from qbdl.quant.fx import WEIGHTED, LeafTracer, module_of, set_module, sole_user
from qbdl.quant.layers import QuantLayer
from qbdl.quant.prepared import ObservedAdd, ObservedQuant, PreparedLayer
from qbdl.quant.ptq import convert, prepare


@dataclass
class AblationIndex:
    """What an ablation model knows of itself: its INT8 layers (QBNN order), their graph order, the QBNN."""

    layers: list[AblationLayer]  # in the QBNN's module order: the order its samplers draw in
    graph_order: list[str]  # the layers' names in the order the graph runs them
    qbnn: nn.Module = field(repr=False)  # shared with the caller, not copied


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


def _ablation_layers(model: nn.Module) -> list[AblationLayer]:
    return [m for m in model.modules() if isinstance(m, AblationLayer)]


def sites_of(model: nn.Module) -> list[Site]:
    """The quantization sites of an ablation model that keep statistics (all but the pool requantizers)."""
    return [m for m in model.modules() if isinstance(m, Site) and not isinstance(m, Requant)]


def _draw_hook(model: nn.Module, args) -> None:
    layers = [m for m in model.ablation.layers if m.sampling and m.bayesian and m.layer_mode() == "sample"]
    if not layers:
        return
    if any(m.q.inplace_capable and m.q.inplace_sampler is None for m in layers):
        # the in-place sampler is built by the QBNN's first sampled forward: build it, leave the RNG alone
        devices = []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.ablation.qbnn(args[0].detach().cpu())
    for m in layers:  # the QBNN's order (its prefetch hook draws every layer up front, in module order)
        m.drawn = int8_sample(m.q)


def _is_avg_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(gm, node), _AVG_POOLS)
    if node.op == "call_function":
        return node.target in _AVG_FNS
    return node.op == "call_method" and node.target == "mean"


def _producer_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node):
        mod = module_of(gm, src)
        if isinstance(mod, Site):
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
        if not isinstance(module_of(gm, n), Site):
            todo.extend(n.users)
    return False


def check_qbnn(qbnn: nn.Module) -> nn.Module:
    """The converted QBNN of `qbnn` (converting a calibrated prepared model); refuses per-example samplers."""
    if any(isinstance(m, PreparedLayer) for m in qbnn.modules()):  # a calibrated prepared model
        qbnn = convert(qbnn)
    layers = [m for m in qbnn.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("error budget: the second model is neither a converted QBNN nor a prepared model")
    bad = sorted({m.sampler for m in layers if m.bayesian and not m.impl.shared_sample})
    if bad:
        shared = [n for n in sampler_names() if sampler_class(n).shared_sample]
        raise NotImplementedError(
            f"error budget: QBNN sampler {bad} is not supported (per-example samples, as INT8 Flipout's, have no "
            f"shared weight sample to compare); convert with a sampler of {shared}"
        )
    return qbnn


def ablation_model(bnn: nn.Module, qbnn: nn.Module) -> fx.GraphModule:
    """An FP32 copy of `bnn` whose quantization parts (PARTS) follow `qbnn` and switch on separately.

    `qbnn`: the converted INT8 model of this BNN (fresh or bank sampling; the ablation reads its int8 weights,
    its samples and its calibrated qparams, so it is shared, not copied) or a calibrated prepared model
    (converted here). Switch parts with :func:`set_parts`; run it like the BNN (mc_logits with a seed).
    """
    qbnn = check_qbnn(qbnn)
    ref = copy.deepcopy(bnn).cpu().eval()
    gm = prepare(ref, backend=None)  # the graph (BN folded, ReLU fused) the QBNN was converted from
    traced = LeafTracer().trace(ref)
    bn_of: dict[str, nn.Module] = {}
    for node in traced.nodes:
        if node.op == "call_module" and isinstance(ref.get_submodule(node.target), WEIGHTED):
            user = sole_user(node)
            if user is not None and user.op == "call_module":
                m = ref.get_submodule(user.target)
                if isinstance(m, BATCH_NORMS):
                    bn_of[node.target] = m
    qmods = dict(qbnn.named_modules())
    for node in list(gm.graph.nodes):
        mod = module_of(gm, node)
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
            new = AblationLayer(node.target, ref.get_submodule(node.target), bn_of.get(node.target), mod, q)
        elif isinstance(mod, ObservedQuant):
            new = AblationQuant(node.target, q)
        else:
            new = AblationAdd(node.target, mod.relu, q)
        set_module(gm, node.target, new)
    n_pool = 0
    for node in list(gm.graph.nodes):
        if _is_avg_pool(gm, node):
            src = _producer_site(gm, node)
            if src is None:
                continue
            name = f"requant_pool_{n_pool}"
            n_pool += 1
            gm.add_submodule(name, Requant(name, src))
            with gm.graph.inserting_after(node):
                rq = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(rq)
            rq.args = (node,)
    gm.graph.lint()
    gm.recompile()
    graph_order = []
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if isinstance(mod, AblationLayer):
            graph_order.append(mod.site_name)
            src = module_of(gm, node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            # what an FP32 layer leaves unquantized: the network input it reads, the logits it writes;
            # the site is held as a plain reference, not as a second parent of it in the module tree
            object.__setattr__(mod, "input_site", src if type(src) is AblationQuant else None)
            mod.feeds_output = _reaches_output(gm, node)
    order = {id(m): i for i, m in enumerate(qbnn.modules())}
    layers = sorted(_ablation_layers(gm), key=lambda m: order[id(m.q)])
    gm.ablation = AblationIndex(layers, graph_order, qbnn)  # a plain attribute: the QBNN is no submodule
    gm.register_forward_pre_hook(_draw_hook)
    for m in layers:
        err = (m.mu_fold - m.mu_deq).abs() / channel_view(m.q.mu_scale, m.mu_fold.dim())
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
            f"(it has {getattr(getattr(model, 'ablation', None), 'graph_order', [m.site_name for m in layers])})"
        )
    for m in model.modules():
        if isinstance(m, Site):
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


class collect_stats:  # noqa: N801 - a context manager named like the function it stands for
    """Context: accumulate the pre-quantization statistics of every site into `sink`."""

    def __init__(self, model: nn.Module, sink: dict) -> None:
        self.sites, self.sink = sites_of(model), sink

    def __enter__(self) -> dict:
        for s in self.sites:
            s.stats = self.sink
        return self.sink

    def __exit__(self, *exc) -> None:
        for s in self.sites:
            s.stats = None
