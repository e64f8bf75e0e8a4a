"""convert: a calibrated prepared model (ptq.prepare + calibrate) -> the INT8 graph of QuantLayers.

Each PreparedLayer becomes a QuantLayer (int8 mu / sigma per output channel, int32 bias, the sampler's
options), each observer a Quantize / QAdd with its calibrated qparams; lower() then wires the integer graph.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from ..bayes.layers import BayesianConv1d, BayesianConv2d, BayesianConv3d, BayesianLayer, BayesianLinear
from . import noise
from .activations import DeQuantize, QAdd, Quantize
from .backend import KernelPlan, check_backend, kernel_plan
from .contract import sampler_class
from .fx import module_of
from .layers import FRESH_KERNELS, QuantLayer, enable_prefetch
from .lower import lower
from .prepared import DeQuantMarker, ObservedAdd, ObservedQuant, PreparedLayer


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
        mod = module_of(gm, src)
        if isinstance(mod, (PreparedLayer, ObservedQuant, ObservedAdd)):
            return mod.obs.qparams(bits=bits)
        nxt = [a for a in src.args if isinstance(a, fx.Node)]
        if not nxt:
            break
        src = nxt[0]
    raise RuntimeError(f"{node.name}: no quantized activation feeds this layer")


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
        w_scale = noise.sample_scale(noise.dequantize(mu_q, mu_scale), noise.dequantize(sigma_q, sigma_scale))
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
    sampler: str = "fresh",
    bank_size: int = 16,
    seed: int = 0,
    backend: str | None = None,
    pack_workers: int = 2,
    fresh_kernel: str = "auto",
    noise_slots: int = noise.NOISE_SLOTS,
) -> fx.GraphModule:
    """Turn a calibrated prepared model into a CPU INT8 model (QBNN, or QDNN without Bayesian layers).

    sampler: 'fresh' (new int8 weights every forward), 'bank' (bank_size samples packed once from `seed`) or
    'flipout' (each example its own weight sample: Flipout signs over bank_size banked int8 perturbations,
    two INT8 convs per layer; needs prepare(..., per_example=True), the x86/onednn backend, qbdl's C++ ops).
    Forward takes float x, returns float logits. pack_workers: threads that sample and pack fresh weights
    while the forward runs (0: sequentially inside each layer; outputs are identical either way).
    fresh_kernel: 'auto' writes fresh samples straight into oneDNN-packed weights (x86/onednn backends,
    conv2d/linear; see inplace.py), 'prepack' re-packs every sample through the public prepack ops.
    noise_slots: ignored (kept for callers of earlier versions): the weight noise is generated from a
    counter (noise.py), so every MC sample has its own and none is stored.
    """
    needs_ranges = sampler_class(sampler).needs_input_ranges
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
        mod = module_of(gm, node)
        if isinstance(mod, PreparedLayer):
            in_scale, _ = _input_qparams(gm, node, bits)  # the zero point is wired by lower()
            config = {
                "qmax": qmax,
                "backend": backend,
                "sampler": sampler,
                "bank_size": bank_size,
                "seed": seed,
                "index": index,
                "fresh_kernel": fresh_kernel,
            }  # no "noise_slots": the noise is generated from a counter (noise.py); only older files have it
            if mod.bayesian:
                config["mode"] = mod.layer.mode
                bayes = True
                if mod.obs_mean is not None and mod.obs_mean.initialized:
                    config["mean_scale"], config["mean_zp"] = mod.obs_mean.qparams()  # an output: full range
                    lo, hi = mod.obs_pert.range()
                    config["pert_scale"] = max(abs(lo), abs(hi), 1e-8) / 127  # zero point 128: symmetric
                elif needs_ranges:
                    raise ValueError(
                        f"{node.target}: sampler={sampler!r} needs per-example calibration ranges (for 'flipout': "
                        "those of INT8 Flipout's two terms); prepare the model with prepare(..., per_example=True) "
                        f"(quantize_bnn does this for sampler={sampler!r}) and calibrate it again"
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
        "sampler": sampler,
        "bank_size": bank_size,
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
