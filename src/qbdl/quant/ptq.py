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
from torch import Tensor, fx, nn

from ..bayes.convert import refuse_custom_forward
from ..bayes.layers import BayesianConv1d, BayesianConv2d, BayesianConv3d, BayesianLayer, BayesianLinear
from ..bayes.predict import sample_seed, sampling
from . import noise
from .activations import DeQuantize, QAdd, Quantize
from .backend import KernelPlan, check_backend, kernel_plan
from .fold import fold_bn
from .layers import FRESH_KERNELS, SAMPLINGS, QuantLayer, enable_prefetch
from .lower import lower
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


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


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
    per_example: also calibrate the ranges convert(mode='flipout') needs (two more FP32 convs per Bayesian
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


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, (BayesianLinear, nn.Linear)):
        return "linear"
    nd = {BayesianConv1d: 1, BayesianConv2d: 2, BayesianConv3d: 3, nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
    return f"conv{next(v for k, v in nd.items() if isinstance(layer, k))}d"


def plan_for(prepared: nn.Module, backend: str) -> KernelPlan:
    """The kernel plan (activation range, kernel families per layer) of a prepared model on `backend`."""
    layers = {
        name: (_layer_kind(m.layer), int(getattr(m.layer, "groups", 1)), m.bayesian)
        for name, m in prepared.named_modules()
        if isinstance(m, PreparedLayer)
    }
    return kernel_plan(backend, layers)


def _input_qparams(gm: fx.GraphModule, node: fx.Node, bits: int = 8) -> tuple[float, int]:
    """qparams of the activation feeding `node`: walk back through shape/pool ops to an observed producer."""
    src = node.args[0]
    while isinstance(src, fx.Node):
        mod = _module(gm, src)
        if isinstance(mod, (PreparedLayer, ObservedQuant, ObservedAdd)):
            return mod.obs.qparams(bits=bits)
        nxt = [a for a in src.args if isinstance(a, fx.Node)]
        if not nxt:
            break
        src = nxt[0]
    raise RuntimeError(f"{node.name}: no quantized activation feeds this layer")


def _deq(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.view(-1, *[1] * (q.dim() - 1))


@torch.no_grad()
def _quantize_layer(prep: PreparedLayer, in_scale: float, config: dict) -> QuantLayer:
    layer = prep.layer
    kind = _layer_kind(layer)
    if kind != "linear":
        config.update(
            stride=list(layer.stride),
            padding=list(layer.padding),
            dilation=list(layer.dilation),
            groups=layer.groups,
        )
    out_scale, out_zp = prep.obs.qparams(bits=config["qmax"].bit_length())
    config.update(kind=kind, relu=prep.relu, in_scale=in_scale, out_scale=out_scale, out_zp=out_zp)
    bayes = isinstance(layer, BayesianLayer)
    mu = (layer.mu_weight if bayes else layer.weight).detach().float().cpu()

    def sym(w: Tensor) -> tuple[Tensor, Tensor]:
        scale = (w.abs().flatten(1).amax(1) / 127).clamp_min(1e-12)
        q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp_(-127, 127).to(torch.int8)
        return q, scale

    mu_q, mu_scale = sym(mu)
    sigma_q = sigma_scale = None
    if bayes:
        sigma_q, sigma_scale = sym(layer.sigma_weight.detach().float().cpu())
    # The int32 bias is in units of input_scale * (the scale of the weights it is added to).
    w_scale = mu_scale
    if bayes:
        w_scale = noise.sample_scale(_deq(mu_q, mu_scale), _deq(sigma_q, sigma_scale))
    bias_scale = in_scale * w_scale
    bias = bias_sigma = None
    b_mu = layer.mu_bias if bayes else layer.bias
    if b_mu is not None:
        bias = b_mu.detach().float().cpu()
        if bayes:
            bias_sigma = layer.sigma_bias.detach().float().cpu()
    if prep.det_bias is not None:
        bias = prep.det_bias.float().cpu() + (0 if bias is None else bias)
    bias_q = None if bias is None else torch.round(bias / bias_scale).to(torch.int32)
    bias_sigma_q = None if bias_sigma is None else torch.round(bias_sigma / bias_scale).to(torch.int32)
    return QuantLayer(config, mu_q, mu_scale, sigma_q, sigma_scale, bias_q, bias_sigma_q)


def convert(
    prepared: fx.GraphModule,
    mode: str = "fresh",
    bank_size: int = 16,
    seed: int = 0,
    backend: str | None = None,
    pack_workers: int = 2,
    fresh_kernel: str = "auto",
    noise_slots: int = noise.NOISE_SLOTS,
) -> fx.GraphModule:
    """Turn a calibrated prepared model into a CPU INT8 model (QBNN, or QDNN without Bayesian layers).

    mode: 'fresh' (new int8 weights every forward), 'bank' (bank_size samples packed once from `seed`) or
    'flipout' (each example its own weight sample: Flipout signs over bank_size banked int8 perturbations,
    two INT8 convs per layer; needs prepare(..., per_example=True), the x86/onednn backend, qbdl's C++ ops).
    Forward takes float x, returns float logits. pack_workers: threads that sample and pack fresh weights
    while the forward runs (0: sequentially inside each layer; outputs are identical either way).
    fresh_kernel: 'auto' writes fresh samples straight into oneDNN-packed weights (x86/onednn backends,
    conv2d/linear; see inplace.py), 'prepack' re-packs every sample through the public prepack ops.
    noise_slots: windows in each layer's noise pool (noise.py): this many successive samples never share
    noise; memory 2 * noise_slots bytes per weight.
    """
    if mode not in SAMPLINGS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {SAMPLINGS}")
    if fresh_kernel not in FRESH_KERNELS:
        raise ValueError(f"unknown fresh_kernel {fresh_kernel!r}; choose one of {FRESH_KERNELS}")
    if bank_size < 1:
        raise ValueError(f"bank_size must be >= 1, got {bank_size}")
    if noise_slots < 1:
        raise ValueError(f"noise_slots must be >= 1, got {noise_slots}")
    backend = check_backend(backend or getattr(prepared, "qbdl_config", {}).get("backend", "x86"))
    gm = prepared
    plan = plan_for(gm, backend)
    qmax, bits = plan.qmax, plan.qmax.bit_length()
    new_modules: dict[str, nn.Module] = {}
    index = 0
    bayes = False
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if isinstance(mod, PreparedLayer):
            in_scale, _ = _input_qparams(gm, node, bits)  # the zero point is wired by lower()
            config = {
                "qmax": qmax,
                "backend": backend,
                "sampling": mode,
                "bank_size": bank_size,
                "seed": seed,
                "index": index,
                "fresh_kernel": fresh_kernel,
                "noise_slots": noise_slots,
            }
            if mod.bayesian:
                config["mode"] = mod.layer.mode
                bayes = True
                if mod.obs_mean is not None and mod.obs_mean.initialized:
                    config["mean_scale"], config["mean_zp"] = mod.obs_mean.qparams()  # an output: full range
                    lo, hi = mod.obs_pert.range()
                    config["pert_scale"] = max(abs(lo), abs(hi), 1e-8) / 127  # zero point 128: symmetric
                elif mode == "flipout":
                    raise ValueError(
                        f"{node.target}: mode='flipout' needs the ranges of INT8 Flipout's two terms; prepare "
                        "the model with prepare(..., per_example=True) (quantize_bnn does this for "
                        "mode='flipout') and calibrate it again"
                    )
            new_modules[node.target] = _quantize_layer(mod, in_scale, config)
            index += 1
        elif isinstance(mod, ObservedQuant):
            new_modules[node.target] = Quantize(*mod.obs.qparams(bits=bits), qmax=qmax)
        elif isinstance(mod, ObservedAdd):
            new_modules[node.target] = QAdd(mod.relu, *mod.obs.qparams(bits=bits), qmax=qmax)
        elif isinstance(mod, DeQuantMarker):
            new_modules[node.target] = DeQuantize()
    root = nn.Module()
    for node in gm.graph.nodes:  # every other leaf (pooling, flatten, dropout, ...) is reused on CPU
        if node.op == "call_module" and node.target not in new_modules:
            new_modules[node.target] = copy.deepcopy(gm.get_submodule(node.target)).cpu()
    for path, m in new_modules.items():
        attach_module(root, path, m)
    graph = copy.deepcopy(gm.graph)
    q = lower(fx.GraphModule(root, graph, class_name="QBNN" if bayes else "QDNN"))
    q.eval()
    q.qbdl_meta = {
        "kind": "qbnn" if bayes else "qdnn",
        "mode": mode,
        "bank_size": bank_size,
        "noise_slots": noise_slots,
        "seed": seed,
        "backend": backend,
        **plan.as_dict(),
    }
    return enable_prefetch(q, pack_workers)


def attach_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Add `module` to `root` at dotted `path`, creating empty parent modules on the way."""
    parts = path.split(".")
    cur = root
    for p in parts[:-1]:
        if not hasattr(cur, p):
            cur.add_module(p, nn.Module())
        cur = getattr(cur, p)
    cur.add_module(parts[-1], module)


def quantize_bnn(
    model: nn.Module,
    batches: Iterable,
    backend: str = "x86",
    mode: str = "fresh",
    bank_size: int = 16,
    calib_batches: int | None = None,
    mc_samples: int = 4,
    observer: str = "minmax",
    seed: int = 0,
    fresh_kernel: str = "auto",
    noise_slots: int = noise.NOISE_SLOTS,
) -> fx.GraphModule:
    """prepare -> calibrate (first calib_batches of `batches`, training data) -> convert; input untouched."""
    prepared = prepare(model, backend=backend, observer=observer, per_example=mode == "flipout")
    if calib_batches is not None:
        batches = itertools.islice(batches, calib_batches)
    calibrate(prepared, batches, mc_samples=mc_samples, seed=seed)
    return convert(
        prepared,
        mode=mode,
        bank_size=bank_size,
        seed=seed,
        backend=backend,
        fresh_kernel=fresh_kernel,
        noise_slots=noise_slots,
    )


def quant_layers(model: nn.Module) -> list[QuantLayer]:
    """The INT8 conv/linear layers of a converted model, in module order."""
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


def set_sampling(
    model: nn.Module, mode: str, bank_size: int | None = None, seed: int | None = None
) -> nn.Module:
    """Switch a QBNN between 'fresh' and 'bank' sampling in place."""
    for m in quant_layers(model):
        if m.bayesian:
            m.set_sampling(mode, bank_size, seed)
    meta = getattr(model, "qbdl_meta", None)
    if meta is not None:
        meta["mode"] = mode
        if bank_size is not None:
            meta["bank_size"] = bank_size
        if seed is not None:
            meta["seed"] = seed
    return model
