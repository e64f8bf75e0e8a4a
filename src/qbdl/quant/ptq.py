"""Post-training quantization of BNNs and DNNs: prepare (fold BN, fuse ReLU, observe) -> calibrate -> convert.

The model is traced with torch.fx (conv/linear and Bayesian layers as leaves) so any net built from
conv/linear, BatchNorm, ReLU, residual adds (`+`, or a torch.ao FloatFunctional), pooling and flatten works,
not one hard-wired architecture. The input is quantized where the net starts (or at a torch.ao QuantStub)
and the output dequantized where it ends (or at a DeQuantStub); torch.ao is never imported.
"""

from __future__ import annotations

import copy
import itertools
import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..bayes.convert import refuse_custom_forward
from ..bayes.layers import BayesianLayer
from ..bayes.predict import sample_seed, sampling
from . import noise
from .backend import check_backend
from .conversion import _module, convert, plan_for
from .fold import fold_bn
from .layers import FRESH_KERNELS, SAMPLERS, QuantLayer
from .observers import OBSERVERS, ActObserver
from .prepared import DeQuantMarker, ObservedAdd, ObservedQuant, PreparedLayer

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, BayesianLayer)
_ADDS = (operator.add, operator.iadd, torch.add)
_RELU_FNS = (F.relu, torch.relu)


def _is_ao(m: nn.Module, *names: str) -> bool:
    """True for torch.ao's QuantStub / DeQuantStub / FloatFunctional (by class, without importing torch.ao)."""
    return type(m).__name__ in names and type(m).__module__.startswith("torch.ao")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # every Conv/Linear (subclasses too) is a leaf, so prepare sees it and can refuse a custom forward
        if isinstance(m, (*_WEIGHTED, PreparedLayer, ObservedQuant, ObservedAdd)) or _is_ao(
            m, "QuantStub", "DeQuantStub"
        ):
            return True
        return super().is_leaf_module(m, qualname)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FNS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def prepare(
    model: nn.Module,
    backend: str | None = "x86",
    observer: str = "minmax",
    fuse_relu: bool = True,
    per_example: bool = False,
) -> fx.GraphModule:
    """Copy `model`, fold BN exactly into the preceding (Bayesian) conv/linear, fuse ReLU, insert observers.

    The result runs in FP32 (sample or mean mode as the Bayesian layers say); calibrate() then convert().
    per_example: also calibrate the ranges convert(sampler='flipout') needs (two more FP32 convs per Bayesian
    layer and calibration pass).
    """
    if backend is not None:  # None: fake-quant only (simulate), any device
        check_backend(backend)
    if observer not in OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {OBSERVERS}")
    model = copy.deepcopy(model).eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    gm = fx.GraphModule(model, _Tracer().trace(model), class_name=f"Prepared{type(model).__name__}")
    graph = gm.graph

    # FloatFunctional's activation_post_process is an Identity placeholder: drop it, keep the add (+relu).
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.endswith("activation_post_process"):
            # (the GraphModule keeps only leaves, so ask the original model what the parent was)
            parent = model.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else None
            if _is_ao(parent, "FloatFunctional"):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)

    n_add = 0
    removed: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node in removed:
            continue
        mod = _module(gm, node)
        if isinstance(mod, _WEIGHTED):
            refuse_custom_forward(str(node.target), mod, "prepare")
            if getattr(mod, "padding_mode", "zeros") != "zeros":
                raise NotImplementedError(
                    f"{node.target}: padding_mode {mod.padding_mode!r} is not quantizable"
                )
            det_bias = None
            user = _sole_user(node)
            if user is not None and isinstance(_module(gm, user), nn.modules.batchnorm._BatchNorm):
                mod, det_bias = fold_bn(mod, _module(gm, user))
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                removed.add(user)
            relu = False
            user = _sole_user(node)
            if fuse_relu and user is not None and _is_relu(gm, user):
                relu = True
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                removed.add(user)
            _set_module(gm, node.target, PreparedLayer(mod, det_bias, relu, observer, per_example))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise NotImplementedError(
                f"{node.target}: BatchNorm that does not follow a conv/linear cannot be folded"
            )
        elif _is_ao(mod, "QuantStub"):
            _set_module(gm, node.target, ObservedQuant(observer))
        elif _is_ao(mod, "DeQuantStub"):
            _set_module(gm, node.target, DeQuantMarker())
        elif node.op == "call_function" and node.target in _ADDS:
            a, b = (node.args + (None, None))[:2]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or len(node.args) > 2 or node.kwargs:
                raise NotImplementedError(f"{node.name}: only tensor + tensor adds are quantizable")
            relu = False
            user = _sole_user(node)
            if fuse_relu and user is not None and _is_relu(gm, user):
                relu = True
            name = f"qadd_{n_add}"
            n_add += 1
            gm.add_submodule(name, ObservedAdd(relu, observer))
            with graph.inserting_after(node):
                new = graph.call_module(name, (a, b))
            if relu:
                user.replace_all_uses_with(new)
                graph.erase_node(user)
                removed.add(user)
            node.replace_all_uses_with(new)
            graph.erase_node(node)

    # Nets without stubs (plain Sequential): quantize every input, dequantize the output.
    if not any(isinstance(m, ObservedQuant) for m in gm.modules()):
        for i, ph in enumerate([n for n in graph.nodes if n.op == "placeholder"]):
            gm.add_submodule(f"quant_input_{i}", ObservedQuant(observer))
            with graph.inserting_after(ph):
                q = graph.call_module(f"quant_input_{i}", (ph,))
            ph.replace_all_uses_with(q)
            q.args = (ph,)
        out = next(n for n in graph.nodes if n.op == "output")
        if isinstance(out.args[0], fx.Node):
            gm.add_submodule("dequant_output", DeQuantMarker())
            with graph.inserting_before(out):
                d = graph.call_module("dequant_output", (out.args[0],))
            out.args = (d,)
    # Logits keep their full range: clipping (percentile/histogram) would tie the top classes.
    for node in graph.nodes:
        if isinstance(_module(gm, node), DeQuantMarker) and isinstance(node.args[0], fx.Node):
            src = _module(gm, node.args[0])
            if isinstance(src, (PreparedLayer, ObservedAdd)):
                src.obs = ActObserver("minmax")
                if getattr(src, "obs_mean", None) is not None:
                    src.obs_mean, src.obs_pert = ActObserver("minmax"), ActObserver("minmax")
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.qbdl_config = {"backend": backend or "x86", "observer": observer}
    if backend is not None:  # QAT fake-quantizes activations on the grid the INT8 kernels will use
        qmax = plan_for(gm, backend).qmax
        for m in _observers(gm):
            m.act_qmax = qmax
        gm.qbdl_config["activation_qmax"] = qmax
    return gm.to(device)


def _observers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (PreparedLayer, ObservedQuant, ObservedAdd))]


def freeze_ranges(prepared: nn.Module) -> nn.Module:
    """Stop every activation observer of a calibrated prepared model: its ranges stay as they are."""
    for m in _observers(prepared):
        m.obs.enabled = False
    return prepared


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: Iterable, mc_samples: int = 4, seed: int = 0) -> nn.Module:
    """Record activation ranges over `batches` ((x, y) tuples or x), mc_samples seeded sample-mode passes each.

    `batches` must be training data (never test data). Returns `prepared` (calibrated in place).
    """
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    stochastic = any(isinstance(m, BayesianLayer) for m in prepared.modules())
    passes = mc_samples if stochastic else 1
    for m in _observers(prepared):
        m.obs.enabled = True
    was_training = prepared.training
    prepared.eval()
    device = next((p.device for p in prepared.parameters()), torch.device("cpu"))
    n = 0
    try:
        with sampling(prepared, "sample"):
            for i, batch in enumerate(batches):
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x.to(device)
                for s in range(passes):
                    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                        torch.manual_seed(sample_seed(seed, i * passes + s))
                        prepared(x)
                n += 1
    finally:
        prepared.train(was_training)
    if n == 0:
        raise ValueError("calibration set is empty: calibrate() needs at least one batch of training data")
    return prepared


def check_options(
    backend: str = "x86",
    sampler: str = "fresh",
    calib_batches: int | None = None,
    observer: str = "minmax",
    fresh_kernel: str = "auto",
    **other: object,
) -> None:
    """Refuse unknown quantize_bnn options with the fix, before any training or calibration has run."""
    if "mode" in other:  # configs written before the rename
        raise ValueError("quant.mode is now quant.sampler (fresh | bank | flipout): rename the option")
    check_backend(backend)
    for name, value, allowed in (
        ("sampler", sampler, SAMPLERS),
        ("fresh_kernel", fresh_kernel, FRESH_KERNELS),
        ("observer", observer, OBSERVERS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown quant.{name} {value!r}; choose one of {list(allowed)}")
    if calib_batches is not None and calib_batches < 1:
        raise ValueError(f"quant.calib_batches must be >= 1, got {calib_batches} (calibration needs data)")


def quantize_bnn(
    model: nn.Module,
    batches: Iterable,
    backend: str = "x86",
    sampler: str = "fresh",
    bank_size: int = 16,
    calib_batches: int | None = None,
    mc_samples: int = 4,
    observer: str = "minmax",
    seed: int = 0,
    fresh_kernel: str = "auto",
    noise_slots: int = noise.NOISE_SLOTS,
) -> fx.GraphModule:
    """prepare -> calibrate (first calib_batches of `batches`, training data) -> convert; input untouched."""
    prepared = prepare(model, backend=backend, observer=observer, per_example=sampler == "flipout")
    if calib_batches is not None:
        batches = itertools.islice(batches, calib_batches)
    calibrate(prepared, batches, mc_samples=mc_samples, seed=seed)
    return convert(
        prepared,
        sampler=sampler,
        bank_size=bank_size,
        seed=seed,
        backend=backend,
        fresh_kernel=fresh_kernel,
        noise_slots=noise_slots,
    )


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """The INT8 conv/linear layers of a converted model, in module order."""
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def set_sampler(
    model: nn.Module, sampler: str, bank_size: int | None = None, seed: int | None = None
) -> nn.Module:
    """Switch a QBNN's sampler (e.g. between 'fresh' and 'bank') in place."""
    for m in quant_layers(model):
        if m.bayesian:
            m.set_sampler(sampler, bank_size, seed)
    meta = getattr(model, "qbdl_meta", None)
    if meta is not None:
        meta["sampler"] = sampler
        if bank_size is not None:
            meta["bank_size"] = bank_size
        if seed is not None:
            meta["seed"] = seed
    return model
