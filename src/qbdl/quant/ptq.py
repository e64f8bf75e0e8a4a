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
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..bayes.convert import refuse_custom_forward
from ..bayes.layers import BayesianLayer
from ..bayes.predict import sample_seed, sampling
from . import noise
from .backend import check_backend
from .contract import sampler_class, sampler_names
from .conversion import convert, plan_for
from .fold import BATCH_NORMS, fold_bn
from .fx import WEIGHTED, LeafTracer, is_ao, module_of, set_module, sole_user
from .layers import FRESH_KERNELS, QuantLayer
from .observers import OBSERVERS, ActObserver
from .prepared import DeQuantMarker, ObservedAdd, ObservedQuant, PreparedLayer

_ADDS = (operator.add, operator.iadd, torch.add)
_RELU_FNS = (F.relu, torch.relu)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module_of(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FNS
    return node.op == "call_method" and node.target in ("relu", "relu_")


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
    gm = fx.GraphModule(model, LeafTracer().trace(model), class_name=f"Prepared{type(model).__name__}")
    graph = gm.graph

    # FloatFunctional's activation_post_process is an Identity placeholder: drop it, keep the add (+relu).
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.endswith("activation_post_process"):
            # (the GraphModule keeps only leaves, so ask the original model what the parent was)
            parent = model.get_submodule(node.target.rpartition(".")[0]) if "." in node.target else None
            if is_ao(parent, "FloatFunctional"):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)

    n_add = 0
    removed: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node in removed:
            continue
        mod = module_of(gm, node)
        if isinstance(mod, WEIGHTED):
            refuse_custom_forward(str(node.target), mod, "prepare")
            if getattr(mod, "padding_mode", "zeros") != "zeros":
                raise NotImplementedError(
                    f"{node.target}: padding_mode {mod.padding_mode!r} is not quantizable"
                )
            det_bias = None
            user = sole_user(node)
            if user is not None and isinstance(module_of(gm, user), BATCH_NORMS):
                mod, det_bias = fold_bn(mod, module_of(gm, user))
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                removed.add(user)
            relu = False
            user = sole_user(node)
            if fuse_relu and user is not None and _is_relu(gm, user):
                relu = True
                user.replace_all_uses_with(node)
                graph.erase_node(user)
                removed.add(user)
            set_module(gm, node.target, PreparedLayer(mod, det_bias, relu, observer, per_example))
        elif isinstance(mod, BATCH_NORMS):
            raise NotImplementedError(
                f"{node.target}: BatchNorm that does not follow a conv/linear cannot be folded"
            )
        elif is_ao(mod, "QuantStub"):
            set_module(gm, node.target, ObservedQuant(observer))
        elif is_ao(mod, "DeQuantStub"):
            set_module(gm, node.target, DeQuantMarker())
        elif node.op == "call_function" and node.target in _ADDS:
            a, b = (node.args + (None, None))[:2]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or len(node.args) > 2 or node.kwargs:
                raise NotImplementedError(f"{node.name}: only tensor + tensor adds are quantizable")
            relu = False
            user = sole_user(node)
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
        if isinstance(module_of(gm, node), DeQuantMarker) and isinstance(node.args[0], fx.Node):
            src = module_of(gm, node.args[0])
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
        names = " | ".join(sampler_names())
        raise ValueError(f"quant.mode is now quant.sampler ({names}): rename the option")
    check_backend(backend)
    try:
        sampler_class(sampler)
    except ValueError:
        raise ValueError(
            f"unknown quant.sampler {sampler!r}; choose one of {list(sampler_names())}"
        ) from None
    for name, value, allowed in (
        ("fresh_kernel", fresh_kernel, FRESH_KERNELS),
        ("observer", observer, OBSERVERS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown quant.{name} {value!r}; choose one of {list(allowed)}")
    if calib_batches is not None and calib_batches < 1:
        raise ValueError(f"quant.calib_batches must be >= 1, got {calib_batches} (calibration needs data)")


@dataclass(frozen=True)
class PTQOptions:
    """quantize_bnn's options and its three stages with them (the run's estimate times each stage)."""

    backend: str = "x86"
    sampler: str = "fresh"
    bank_size: int = 16
    calib_batches: int | None = None
    mc_samples: int = 4
    observer: str = "minmax"
    seed: int = 0
    fresh_kernel: str = "auto"
    noise_slots: int = noise.NOISE_SLOTS

    def prepare(self, model: nn.Module) -> fx.GraphModule:
        """prepare() for this sampler (with the per-example ranges it may need)."""
        per_example = sampler_class(self.sampler).needs_input_ranges
        return prepare(model, backend=self.backend, observer=self.observer, per_example=per_example)

    def calibrate(self, prepared: nn.Module, batches: Iterable) -> nn.Module:
        """calibrate() on the first calib_batches of `batches` (training data)."""
        if self.calib_batches is not None:
            batches = itertools.islice(batches, self.calib_batches)
        return calibrate(prepared, batches, mc_samples=self.mc_samples, seed=self.seed)

    def convert(self, prepared: fx.GraphModule) -> fx.GraphModule:
        """convert() with these options."""
        return convert(
            prepared,
            sampler=self.sampler,
            bank_size=self.bank_size,
            seed=self.seed,
            backend=self.backend,
            fresh_kernel=self.fresh_kernel,
            noise_slots=self.noise_slots,
        )


#: The names of quantize_bnn's options (PTQOptions' fields).
PTQ_OPTIONS = tuple(f.name for f in fields(PTQOptions))


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
    opts = PTQOptions(backend, sampler, bank_size, calib_batches, mc_samples, observer, seed, fresh_kernel,
                      noise_slots)  # fmt: skip
    return opts.convert(opts.calibrate(opts.prepare(model), batches))


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """The INT8 conv/linear layers of a converted model, in module order."""
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def set_sampler(
    model: nn.Module, sampler: str, bank_size: int | None = None, seed: int | None = None
) -> nn.Module:
    """Switch a QBNN's sampler (e.g. between 'fresh' and 'bank') in place."""
    sampler_class(sampler)  # a model without Bayesian layers refuses an unknown name too
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
