"""Fidelity error budget: where, and by how much, does a QBNN depart from its FP32 BNN?

    python -m qbdl.fidelity RUN_DIR [--mc-samples S] [--seed N] [--floor-seeds K] [--max-batches B]

For a trained BNN and its INT8 QBNN, with the same MC seeds, the QBNN-vs-BNN gap of accuracy, NLL, UCE,
ECE, Brier and OOD AUROC is split into three parts, each switched on alone and in every combination by
one configurable forward (:func:`ablation_model`), computed in FP32 with fake quantization:

(a) ``weights``: mu and sigma on the converted model's int8 grids (``mu_q * mu_scale``,
    ``sigma_q * sigma_scale``, per output channel, BN folded) and the int32 bias (``bias_q * bias_scale``);
    weight samples are still FP32 Gaussian, with the BNN's own random numbers.
(b) ``sampling``: the QBNN's integer sampling path replaces FP32 Gaussian sampling: the weight perturbation
    of the INT8 sample ``w_int8 * S - mu_q * mu_scale`` (pool noise clamped at +-4 on a 1/64 grid, random
    global sign, fixed-point construction, rounding to the coarser sample grid S = max(|mu| + 3 sigma)/127,
    clamp +-127) and its bias noise, taken from the QuantLayer itself for the same MC index and seed (the
    very int8 weight the INT8 kernel computes with). With (a) on this *is* the INT8 sample; with (a) off the
    perturbation is added to the FP32 mean.
(c) ``activations``: every activation the INT8 graph quantizes (the input, each conv/linear output after
    its fused ReLU, each residual add, average pools, the logits) fake-quantized with the QBNN's calibrated
    scale, zero point and range 0..qmax.

'All off' runs the BNN's own modules (unfolded BN, its random numbers): it equals the FP32 BNN bit for bit.
'All on' is an FP32 emulation of the INT8 QBNN: the same int8 weights and qparams, but FP32 convolution and
rounding instead of int32 accumulation and the kernels' requantization, so single activations can land one
LSB apart (``checks.kernel_layers`` measures it per layer on identical int8 inputs) and such flips propagate;
``checks.all_on_vs_qbnn`` measures the end-to-end logit difference and ``gap[m].kernel_residual`` its effect on
each metric. Hence, exactly: ``qbnn - bnn = sum(shapley) + kernel_residual``.

MC noise: the QBNN draws other random numbers than the BNN (integer pool vs torch Gaussians), so the gap of
two independent MC estimates carries MC noise. ``gap[m].mc_floor`` = mean |metric(BNN, seed i) - metric(BNN,
seed j)| over all pairs of ``1 + floor_seeds`` seeds: a gap not clearly above it is not shown to be
quantization. Configurations with (b) off share the BNN's random numbers (paired, far less MC noise).

Keys of the result (and of RUN_DIR/fidelity.json):
    format, mc_samples, seed, floor_seeds, parts {a, b, c: description}, metrics [names],
    n_test, n_ood {name: n}, qbnn {mode, backend, activation_qmax},
    configs {none, a, b, c, ab, ac, bc, abc, bnn, qbnn: {metric: value}},
    floor_values {metric: [value per seed]},
    gap {metric: {bnn, qbnn, gap, emulated, kernel_residual, mc_floor, alone {a,b,c}, leave_one_out {a,b,c},
                  shapley {a,b,c}, interaction}},
    layers {name: {kind, bayesian, mu_sqnr_db, sigma_sqnr_db, bias_sqnr_db, sample_step_over_mu_step,
                   sigma_over_sample_step, sample_noise_var_ratio}},
    sites {name: {kind, scale, zero_point, qmax, range [lo, hi], sqnr_db {data: dB}, clip {data: share},
                  clip_low {data: share}, clip_high {data: share}}}: statistics of the FP32 BNN's activations
        (all parts off, the MC samples of the budget) before quantization on the test set and each OOD set;
        `range` is the INT8 grid [(0 - zp) * scale, (qmax - zp) * scale], a value is clipped when it lies more
        than scale/2 outside it (its error then exceeds rounding's);
    checks {all_off_vs_bnn {max_abs_logit, equal}, all_on_vs_qbnn {max_abs_logit, mean_abs_logit,
            logit_lsb, max_lsb, argmax_agreement}, kernel_layers {name: {mismatch_share, max_lsb}}},
    seconds.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qbdl.bayes.layers import BayesianLayer, random_signs
from qbdl.bayes.predict import mc_logits, sample_seed
from qbdl.quant import inplace
from qbdl.quant.activations import QAdd, Quantize
from qbdl.quant.fold import bn_scale_shift
from qbdl.quant.layers import QuantLayer
from qbdl.quant.prepared import ObservedAdd, ObservedQuant, PreparedLayer
from qbdl.quant.ptq import _WEIGHTED, _module, _set_module, _sole_user, _Tracer, convert, prepare

FORMAT = "qbdl-fidelity/1"
PARTS = ("weights", "sampling", "activations")
SHORT = {"weights": "a", "sampling": "b", "activations": "c"}
PART_DOC = {
    "a": "weights: mu, sigma on the int8 grids (mu_q*mu_scale, sigma_q*sigma_scale), int32 bias",
    "b": "sampling: the QBNN's integer weight sample (pool noise, fixed point, sample grid) vs FP32 Gaussian",
    "c": "activations: fake-quant with the QBNN's calibrated scales, zero points and 0..qmax",
}
#: Every combination of parts, by name ("none", "a", ..., "abc").
CONFIGS = {
    "".join(SHORT[p] for p in combo) or "none": combo
    for r in range(4)
    for combo in itertools.combinations(PARTS, r)
}
BASE_METRICS = ("accuracy", "nll", "uce", "ece", "brier")
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


def _fq(x: Tensor, scale: float, zp: int, qmax: int) -> Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, qmax)


def _chan(t: Tensor, ndim: int, dim: int = 0) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(shape)


class _Site(nn.Module):
    """An activation the INT8 graph quantizes: fake-quant when `activations` is on; optional statistics."""

    site_kind = "site"

    def _init_site(self, name: str, scale: float, zp: int, qmax: int) -> None:
        self.site_name, self.scale, self.zp, self.qmax = name, float(scale), int(zp), int(qmax)
        self.activations = False
        self.stats: dict | None = None  # set by _collect: {site: [sum x^2, sum err^2, n_low, n_high, n]}

    def grid_range(self) -> tuple[float, float]:
        """The real values the INT8 activation can hold: [(0 - zp) * scale, (qmax - zp) * scale]."""
        return (0 - self.zp) * self.scale, (self.qmax - self.zp) * self.scale

    def _out(self, y: Tensor) -> Tensor:
        if self.stats is not None:
            lo, hi = self.grid_range()
            lo, hi = lo - self.scale / 2, hi + self.scale / 2  # beyond these the error exceeds rounding
            yd = y.detach()
            err = (yd - _fq(yd, self.scale, self.zp, self.qmax)).double()
            st = self.stats.setdefault(self.site_name, [0.0, 0.0, 0, 0, 0])
            st[0] += float(yd.double().pow(2).sum())
            st[1] += float(err.pow(2).sum())
            st[2] += int((yd < lo).sum())
            st[3] += int((yd > hi).sum())
            st[4] += yd.numel()
        return _fq(y, self.scale, self.zp, self.qmax) if self.activations else y


class _AblationQuant(_Site):
    site_kind = "input"

    def __init__(self, name: str, q: Quantize) -> None:
        super().__init__()
        self._init_site(name, q.scale, q.zero_point, q.qmax)

    def forward(self, x: Tensor) -> Tensor:
        return self._out(x)


class _AblationAdd(_Site):
    site_kind = "add"

    def __init__(self, name: str, relu: bool, q: QAdd) -> None:
        super().__init__()
        self.relu = bool(relu)
        self._init_site(name, q.scale, q.zero_point, q.qmax)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a + b
        if self.relu:
            y = F.relu(y)
        return self._out(y)


class _Requant(_Site):
    """After an average pool: the INT8 pool rounds its mean to its input's grid (no statistics kept)."""

    site_kind = "pool"

    def __init__(self, name: str, src: _Site) -> None:
        super().__init__()
        self._init_site(name, src.scale, src.zp, src.qmax)

    def forward(self, x: Tensor) -> Tensor:
        return _fq(x, self.scale, self.zp, self.qmax) if self.activations else x


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PackedSampler -> its measured layout


def _unpacked(q: QuantLayer, packed: Tensor) -> Tensor:
    """PackedSampler.unpacked with the layout measured once per sampler (it re-measures on every call)."""
    sampler, shape = q._sampler, tuple(q.mu_q.shape)
    hit = _LAYOUTS.get(sampler)
    if hit is None:
        layout = inplace.discover_layout(sampler.pack, shape)
        keep = layout.src >= 0
        # packed byte p holds weight src[p]: read back in weight order with one gather
        order = torch.empty(math.prod(shape), dtype=torch.long)
        order[layout.src[keep]] = torch.nonzero(keep).flatten()
        hit = _LAYOUTS[sampler] = (layout.data_bytes, order)
    n, order = hit
    data = torch.ops.qbdl.packed_bytes(packed)[:n].view(torch.int8)
    return data[order].view(shape)


def _int8_sample(q: QuantLayer) -> tuple[Tensor, Tensor | None]:
    """The dequantized int8 weight sample and float bias the QuantLayer computes with for this forward.

    Draws the layer's random numbers from the global generator exactly as its own forward (or the prefetch
    hook) does: with the MC index set, the sign then the bias noise.
    """
    if q.sampling == "bank":
        i = q._mc_index
        i = int(torch.randint(0, q.bank_size, (1,))) if i is None else i % q.bank_size
        wq, bias = q.bank_weight(i)
        return wq.float() * _chan(q._w_scale.float(), wq.dim()), bias
    if q.sampling != "fresh":
        raise NotImplementedError(f"error budget: sampling {q.sampling!r} is not supported (fresh, bank)")
    slot, negate, eps_b = q._draw(None)
    if q._sampler is not None:  # the in-place kernel: read back the bytes it will compute with
        wq = _unpacked(q, q._sampler.sample(slot, negate))
        w = wq.float() * _chan(q._w_scale.float(), wq.dim())
    else:
        wq = q._make(slot, negate, eps_b)[0]
        w = wq.float() * _chan(q._w_scale.float(), wq.dim())
    return w, q._bias(eps_b)


class _AblationLayer(_Site):
    """A conv/linear (+BN, +ReLU) whose weights, sampling and output quantization are switched separately."""

    site_kind = "layer"

    def __init__(
        self, name: str, orig: nn.Module, bn: nn.Module | None, prep: PreparedLayer, q: QuantLayer
    ) -> None:
        super().__init__()
        self._init_site(name, q.out_scale, q.out_zp, q.qmax)
        self.orig, self.bn, self.prep, self.q = orig, bn, prep, q
        self.relu = prep.relu
        self.bayesian = isinstance(orig, BayesianLayer)
        if self.bayesian != q.bayesian:
            raise ValueError(
                f"{name}: the QBNN layer is {'' if q.bayesian else 'not '}Bayesian, the BNN's is"
            )
        self.weights = self.sampling = False
        self._draws: tuple[Tensor, Tensor | None] | None = None
        folded = prep.layer
        with torch.no_grad():
            mu = (folded.mu_weight if self.bayesian else folded.weight).detach().float()
            if tuple(mu.shape) != tuple(q.mu_q.shape):
                raise ValueError(f"{name}: BNN weight {tuple(mu.shape)} vs QBNN {tuple(q.mu_q.shape)}")
            nd = mu.dim()
            b = folded.mu_bias if self.bayesian else folded.bias
            bias = None if b is None else b.detach().float()
            if prep.det_bias is not None:
                bias = prep.det_bias.float() + (0 if bias is None else bias)
            s = bn_scale_shift(bn)[0] if bn is not None else torch.ones(mu.shape[0])
            sgn = torch.where(s < 0, -1.0, 1.0).float()
            self.register_buffer("mu_fold", mu.clone())
            self.register_buffer("bias_fold", None if bias is None else bias.clone())
            self.register_buffer("mu_deq", q.mu_q.float() * _chan(q.mu_scale, nd))
            self.register_buffer("bias_deq", None if q.bias_q is None else q.bias_q.float() * q._bias_scale)
            if (self.bias_fold is None) != (self.bias_deq is None):
                raise ValueError(f"{name}: the BNN and the QBNN disagree on having a bias")
            self.register_buffer("sgn", _chan(sgn, nd))
            self.register_buffer("sgn_b", sgn)
            self.register_buffer(
                "sigma_fold", folded.sigma_weight.detach().float().clone() if self.bayesian else None
            )
            self.register_buffer(
                "sigma_deq", q.sigma_q.float() * _chan(q.sigma_scale, nd) if self.bayesian else None
            )
            bs = None
            if self.bayesian and q.bias_sigma_q is not None:
                bs = q.bias_sigma_q.float() * q._bias_scale
            self.register_buffer("bias_sigma_deq", bs)

    def layer_mode(self) -> str:
        """The BNN layer's sampling mode ('mean' for deterministic layers); not `mode`, which sampling() sets."""
        return self.orig.mode if self.bayesian else "mean"

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self.prep._op(x, w, b)

    def _folded(self, x: Tensor) -> Tensor:
        a, b = self.weights, self.sampling
        if not self.bayesian or self.layer_mode() == "mean":
            return self._op(x, self.mu_deq if a else self.mu_fold, self.bias_deq if a else self.bias_fold)
        if b:
            if self._draws is None:
                raise RuntimeError(
                    f"{self.site_name}: no int8 sample drawn (run the ablation model's forward)"
                )
            wq, bq = self._draws
            self._draws = None
            if a:
                return self._op(x, wq, bq)
            w = self.mu_fold + (wq - self.mu_deq)
            bias = None if bq is None else self.bias_fold + (bq - self.bias_deq)
            return self._op(x, w, bias)
        # (a) alone: FP32 Gaussian sampling around the int8 grid values, with the BNN's random numbers in its
        # order; sign(BN scale) maps them onto the folded layer (fold: sigma' = |s| sigma, sample' = s sample).
        orig = self.orig
        if orig.estimator == "reparameterization":
            w = self.mu_deq + self.sgn * self.sigma_deq * torch.randn_like(orig.mu_weight)
            bias = self.bias_deq
            if orig.mu_bias is not None:
                bias = bias + self.sgn_b * self.bias_sigma_deq * torch.randn_like(orig.mu_bias)
            return self._op(x, w, bias)
        out = self._op(x, self.mu_deq, self.bias_deq)  # flipout: the same calls as BayesianLayer._flipout
        delta_w = self.sgn * self.sigma_deq * torch.randn_like(orig.mu_weight)
        delta_b = None
        if orig.mu_bias is not None:
            delta_b = self.sgn_b * self.bias_sigma_deq * torch.randn_like(orig.mu_bias)
        ch = orig._channel_dim
        pert = self._op(x * random_signs(x, ch), delta_w, delta_b)
        return out + pert * random_signs(pert, ch)

    def forward(self, x: Tensor) -> Tensor:
        if not self.weights and not (self.sampling and self.bayesian and self.layer_mode() == "sample"):
            y = self.orig(x)  # the BNN's own modules: bit-exact with the FP32 BNN
            if self.bn is not None:
                y = self.bn(y)
        else:
            y = self._folded(x)
        if self.relu:
            y = F.relu(y)
        return self._out(y)


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


def _check_qbnn(qbnn: nn.Module) -> nn.Module:
    if any(isinstance(m, PreparedLayer) for m in qbnn.modules()):  # a calibrated prepared model
        qbnn = convert(qbnn)
    layers = [m for m in qbnn.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("error budget: the second model is neither a converted QBNN nor a prepared model")
    bad = sorted({m.sampling for m in layers if m.bayesian and m.sampling not in ("fresh", "bank")})
    if bad:
        raise NotImplementedError(
            f"error budget: QBNN sampling {bad} is not supported (per-example INT8 Flipout has no shared weight "
            "sample to compare); convert with mode='fresh' or 'bank'"
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
    model: nn.Module, weights: bool = False, sampling: bool = False, activations: bool = False
) -> nn.Module:
    """Switch the quantization parts of an ablation model (all False: the FP32 BNN; all True: the QBNN)."""
    for m in model.modules():
        if isinstance(m, _AblationLayer):
            m.weights, m.sampling = bool(weights), bool(sampling)
        if isinstance(m, _Site):
            m.activations = bool(activations)
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


# -- prediction and metrics


def _as_x(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def _predict(model: nn.Module, batches: list, samples: int, seed: int) -> Tensor:
    """MC logits [S, N, C]; every batch uses the same per-sample seeds (as qbdl.evaluation does)."""
    return torch.cat([mc_logits(model, _as_x(b).cpu(), samples, seed=seed) for b in batches], dim=1)


def _metrics(logits: Tensor, y: Tensor, ood: dict[str, Tensor], n_bins: int, score: str) -> dict[str, float]:
    from qbdl.metrics.summary import summarize

    p = torch.softmax(logits, -1)
    res = summarize(
        p, y, ood={k: torch.softmax(v, -1) for k, v in ood.items()} or None, n_bins=n_bins, score=score
    )
    out = {k: float(res[k]) for k in BASE_METRICS}
    for name, block in res["ood"].items():
        out[f"ood_auroc/{name}"] = float(block["auroc"])
    if len(res["ood"]) > 1:
        out["ood_auroc_mean"] = sum(float(b["auroc"]) for b in res["ood"].values()) / len(res["ood"])
    return out


def _shapley(v: dict[frozenset, float], player: str) -> float:
    others = [p for p in "abc" if p != player]
    n, total = 3, 0.0
    for r in range(len(others) + 1):
        w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
        for s in itertools.combinations(others, r):
            total += w * (v[frozenset(s) | {player}] - v[frozenset(s)])
    return total


def mc_noise_floor(values: list[float]) -> float:
    """Mean |v_i - v_j| over all pairs of a metric's values under different MC seeds (0 with < 2 values)."""
    pairs = list(itertools.combinations(values, 2))
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else 0.0


def mc_noise_floor_of(
    predict: Callable[[int, int], Tensor],
    metric: Callable[[Tensor], float],
    samples: int,
    seeds: Iterable[int],
) -> float:
    """The MC noise floor of `metric` at `samples` MC samples: predict(samples, seed) -> probabilities."""
    return mc_noise_floor([float(metric(predict(samples, s))) for s in seeds])


def _sqnr_db(x: Tensor, xq: Tensor) -> float | None:
    sig, err = float(x.double().pow(2).sum()), float((x.double() - xq.double()).pow(2).sum())
    if sig == 0:
        return None
    return math.inf if err == 0 else 10 * math.log10(sig / err)


def _db(sig: float, err: float) -> float | None:
    if sig == 0:
        return None
    return math.inf if err == 0 else 10 * math.log10(sig / err)


@torch.no_grad()
def _weight_report(abl: nn.Module, seed: int) -> dict[str, dict]:
    out = {}
    for m in abl._fid_layers:
        q = m.q
        nd = m.mu_fold.dim()
        r: dict[str, Any] = {
            "kind": q.kind,
            "bayesian": m.bayesian,
            "mu_sqnr_db": _sqnr_db(m.mu_fold, m.mu_deq),
        }
        if m.bias_fold is not None:
            r["bias_sqnr_db"] = _sqnr_db(m.bias_fold, m.bias_deq)
        if m.bayesian:
            r["sigma_sqnr_db"] = _sqnr_db(m.sigma_fold, m.sigma_deq)
            step = _chan(q._w_scale.float(), nd)
            r["sample_step_over_mu_step"] = float((q._w_scale / q.mu_scale).median())
            r["sigma_over_sample_step"] = float((m.sigma_deq / step).median())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(seed, 0))
                q.set_mc_index(0)
                try:
                    wq, _ = _int8_sample(q)
                finally:
                    q.set_mc_index(None)
            # variance of the INT8 sample's perturbation over the posterior's: 1 + rounding on the sample grid
            r["sample_noise_var_ratio"] = float((wq - m.mu_deq).pow(2).mean() / m.sigma_deq.pow(2).mean())
        out[m.site_name] = r
    return out


def _emulate_trace(t: dict) -> Tensor:
    """The ablation's FP32 arithmetic on one traced INT8 kernel call: its int8 inputs, weights and qparams."""
    x = (t["x"].float() - t["xz"]) * t["xs"]
    w = t["w"].float()
    ws = t["ws"].float()
    w = w * _chan(ws, w.dim())
    c = t["config"]
    if t["kind"] == "linear":
        y = F.linear(x, w, t["bias"])
    else:
        conv = getattr(F, t["kind"])
        y = conv(x, w, t["bias"], c["stride"], c["padding"], c["dilation"], c["groups"])
    if t["relu"]:
        y = F.relu(y)
    return torch.round(_fq(y, t["os"], t["oz"], t["qmax"]) / t["os"]) + t["oz"]


@torch.no_grad()
def _kernel_check(qbnn: nn.Module, x: Tensor, seed: int) -> dict[str, dict]:
    layers = {n: m for n, m in qbnn.named_modules() if isinstance(m, QuantLayer)}
    for m in layers.values():
        m.trace = []
    try:
        mc_logits(qbnn, x, 1, seed=seed)
        out = {}
        for name, m in layers.items():
            n = bad = 0
            worst = 0.0
            for t in m.trace:
                d = (t["y"].float() - _emulate_trace(t)).abs()
                n, bad, worst = n + d.numel(), bad + int((d > 0).sum()), max(worst, float(d.max()))
            if n:
                out[name] = {"mismatch_share": bad / n, "max_lsb": worst}
    finally:
        for m in layers.values():
            m.trace = None
    return out


def error_budget(
    bnn: nn.Module,
    qbnn: nn.Module,
    test_batches: Iterable,
    ood_batches: dict[str, Iterable] | None = None,
    mc_samples: int = 8,
    seed: int = 0,
    *,
    floor_seeds: int = 3,
    n_bins: int = 15,
    score: str = "entropy",
    max_batches: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The error budget of `qbnn` (converted QBNN, or a calibrated prepared model) against `bnn`; see the module doc.

    test_batches: (x, y) batches of held-out data; ood_batches: {name: batches of x or (x, _)}. Every model
    and configuration sees MC sample s under seed sample_seed(seed, s) on every batch. floor_seeds: extra BNN
    evaluations (seeds seed+1..seed+floor_seeds) for the MC noise floor. Runs on CPU.
    """
    t_start = time.perf_counter()
    say = progress or (lambda _: None)
    cut = (lambda b: list(itertools.islice(b, max_batches))) if max_batches else list
    test = cut(test_batches)
    if not test:
        raise ValueError("error budget: no test batches")
    ood = {k: cut(v) for k, v in (ood_batches or {}).items()}
    y = torch.cat([b[1] for b in test]).long()
    qbnn = _check_qbnn(qbnn)
    bnn = bnn.cpu().eval()
    abl = ablation_model(bnn, qbnn)
    data = {"test": test, **{f"ood/{k}": v for k, v in ood.items()}}

    def run(model: nn.Module, s: int, sink: dict | None = None) -> dict[str, Tensor]:
        out = {}
        for name, batches in data.items():
            if sink is not None:
                with _collect(model, sink.setdefault(name.removeprefix("ood/"), {})):
                    out[name] = _predict(model, batches, mc_samples, s)
            else:
                out[name] = _predict(model, batches, mc_samples, s)
        return out

    def metrics_of(lg: dict[str, Tensor]) -> dict[str, float]:
        return _metrics(
            lg["test"], y, {k[4:]: v for k, v in lg.items() if k.startswith("ood/")}, n_bins, score
        )

    say("qbnn")
    logits = {"qbnn": run(qbnn, seed)}  # first: builds the QBNN's in-place samplers as its evaluation does
    say("bnn")
    logits["bnn"] = run(bnn, seed)
    stats: dict[str, dict] = {}
    for name, parts in CONFIGS.items():
        say(name)
        set_parts(abl, **{p: True for p in parts})
        logits[name] = run(abl, seed, stats if name == "none" else None)
    set_parts(abl)
    configs = {k: metrics_of(v) for k, v in logits.items()}
    metric_names = list(configs["bnn"])
    floor_values = {m: [configs["bnn"][m]] for m in metric_names}
    for j in range(1, floor_seeds + 1):
        say(f"bnn seed +{j}")
        extra = metrics_of(run(bnn, seed + j))
        for m in metric_names:
            floor_values[m].append(extra[m])

    gap = {}
    for m in metric_names:
        v = {frozenset(c for c in name if name != "none"): configs[name][m] for name in CONFIGS}
        base, full = v[frozenset()], v[frozenset("abc")]
        alone = {p: v[frozenset(p)] - base for p in "abc"}
        gap[m] = {
            "bnn": configs["bnn"][m],
            "qbnn": configs["qbnn"][m],
            "gap": configs["qbnn"][m] - configs["bnn"][m],
            "emulated": full - base,
            "kernel_residual": configs["qbnn"][m] - full,
            "mc_floor": mc_noise_floor(floor_values[m]),
            "alone": alone,
            "leave_one_out": {p: full - v[frozenset("abc") - {p}] for p in "abc"},
            "shapley": {p: _shapley(v, p) for p in "abc"},
            "interaction": (full - base) - sum(alone.values()),
        }

    sites = {}
    for s in _sites(abl):
        lo, hi = s.grid_range()
        r: dict[str, Any] = {"kind": s.site_kind, "scale": s.scale, "zero_point": s.zp, "qmax": s.qmax}
        r.update(range=[lo, hi], sqnr_db={}, clip={}, clip_low={}, clip_high={})
        for dname, st in stats.items():
            if s.site_name not in st:
                continue
            x2, e2, nlo, nhi, n = st[s.site_name]
            r["sqnr_db"][dname] = _db(x2, e2)
            r["clip"][dname], r["clip_low"][dname], r["clip_high"][dname] = (nlo + nhi) / n, nlo / n, nhi / n
        sites[s.site_name] = r

    ref, full = logits["qbnn"]["test"], logits["abc"]["test"]
    lsb = next(m.out_scale for m in reversed(list(qbnn.modules())) if isinstance(m, QuantLayer))
    diff = (ref - full).abs()
    checks = {
        "all_off_vs_bnn": {
            "max_abs_logit": max(float((logits["none"][k] - logits["bnn"][k]).abs().max()) for k in data),
            "equal": all(torch.equal(logits["none"][k], logits["bnn"][k]) for k in data),
        },
        "all_on_vs_qbnn": {
            "max_abs_logit": float(diff.max()),
            "mean_abs_logit": float(diff.mean()),
            "logit_lsb": float(lsb),
            "max_lsb": float(diff.max()) / lsb,
            "share_exact": float((diff < lsb / 2).float().mean()),
            "argmax_agreement": float((ref.argmax(-1) == full.argmax(-1)).float().mean()),
        },
        "kernel_layers": _kernel_check(qbnn, _as_x(test[0]).cpu(), seed),
    }
    meta = getattr(qbnn, "qbdl_meta", {}) or {}
    return {
        "format": FORMAT,
        "mc_samples": mc_samples,
        "seed": seed,
        "floor_seeds": [seed + j for j in range(1, floor_seeds + 1)],
        "parts": dict(PART_DOC),
        "metrics": metric_names,
        "n_test": int(y.numel()),
        "n_ood": {k: int(v.shape[1]) for k, v in logits["bnn"].items() if k.startswith("ood/")},
        "qbnn": {k: meta.get(k) for k in ("mode", "backend", "activation_qmax", "bank_size", "noise_slots")},
        "configs": configs,
        "floor_values": floor_values,
        "gap": gap,
        "layers": _weight_report(abl, seed),
        "sites": sites,
        "checks": checks,
        "seconds": time.perf_counter() - t_start,
    }


# -- table, plot, CLI

_SCALE = {"accuracy": 100, "uce": 100, "ece": 100, "brier": 1, "nll": 1}


def _scale(m: str) -> float:
    return _SCALE.get(m, 100 if m.startswith("ood_auroc") else 1)


def format_budget(budget: dict) -> str:
    """A plain-text table: per metric the gap, its MC floor, each part alone, Shapley shares, kernel residual."""
    cols = ["BNN", "QBNN", "gap", "floor", "a", "b", "c", "all(emu)", "sh.a", "sh.b", "sh.c", "kernel"]
    rows = []
    for m, g in budget["gap"].items():
        k = _scale(m)
        vals = [g["bnn"], g["qbnn"], g["gap"], g["mc_floor"], *g["alone"].values(), g["emulated"],
                *g["shapley"].values(), g["kernel_residual"]]  # fmt: skip
        rows.append([m + (" (pt)" if k == 100 else "")] + [f"{v * k:+.3f}" if i >= 2 else f"{v * k:.3f}"
                                                           for i, v in enumerate(vals)])  # fmt: skip
    w0 = max(len(r[0]) for r in rows + [["metric"]])
    lines = ["metric".ljust(w0) + "".join(c.rjust(9) for c in cols)]
    lines += [r[0].ljust(w0) + "".join(c.rjust(9) for c in r[1:]) for r in rows]
    ch = budget["checks"]
    lines.append(
        f"parts: a = {PART_DOC['a']}; b = {PART_DOC['b']}; c = {PART_DOC['c']}. alone: that part only; sh.: Shapley "
        "share (sh.a+sh.b+sh.c = all(emu)); kernel = QBNN - all(emu); floor = MC noise of a BNN-vs-BNN gap."
    )
    on = ch["all_on_vs_qbnn"]
    lines.append(
        f"all off == BNN: {ch['all_off_vs_bnn']['equal']} (max |dlogit| {ch['all_off_vs_bnn']['max_abs_logit']:.2g}); "
        f"all on vs INT8 QBNN: max |dlogit| {on['max_abs_logit']:.3g} ({on['max_lsb']:.1f} logit LSB), "
        f"{100 * on['share_exact']:.1f}% of logits within 1/2 LSB, argmax agreement {100 * on['argmax_agreement']:.2f}%"
    )
    worst = sorted(budget["sites"].items(), key=lambda kv: -max(kv[1]["clip"].values(), default=0))[:3]
    if worst:
        lines.append(
            "most clipped activations: "
            + "; ".join(
                f"{n} " + ", ".join(f"{d} {100 * v:.3f}%" for d, v in s["clip"].items()) for n, s in worst
            )
        )
    return "\n".join(lines)


def plot_budget(budget: dict, path: str | Path) -> Path:
    """fidelity.png: per metric the Shapley parts, kernel residual and gap against the MC floor; per layer
    SQNR of mu, sigma and activations; per site the clipped share on each data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(budget["gap"])
    fig = plt.figure(figsize=(2.8 * max(len(metrics), 4), 8))
    grid = fig.add_gridspec(2, len(metrics))
    colors = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green", "kernel": "tab:gray", "gap": "black"}
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(grid[0, i])
        g, k = budget["gap"][m], _scale(m)
        names = ["a", "b", "c", "kernel", "gap"]
        vals = [g["shapley"]["a"], g["shapley"]["b"], g["shapley"]["c"], g["kernel_residual"], g["gap"]]
        ax.bar(names, [v * k for v in vals], color=[colors[n] for n in names])
        ax.axhspan(-g["mc_floor"] * k, g["mc_floor"] * k, color="tab:red", alpha=0.15, label="MC floor")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(m + (" (pt)" if k == 100 else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        if i == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, : max(1, len(metrics) // 2)])
    names = list(budget["layers"])
    xs = range(len(names))
    for key, label in (("mu_sqnr_db", "mu"), ("sigma_sqnr_db", "sigma")):
        ax.plot(xs, [budget["layers"][n].get(key) or float("nan") for n in names], "o-", ms=3, label=label)
    act = [budget["sites"].get(n, {}).get("sqnr_db", {}).get("test") for n in names]
    ax.plot(xs, [a if a is not None else float("nan") for a in act], "s-", ms=3, label="activation (test)")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB)")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, max(1, len(metrics) // 2) :])
    snames = list(budget["sites"])
    datasets = list(dict.fromkeys(d for s in budget["sites"].values() for d in s["clip"]))
    width = 0.8 / max(len(datasets), 1)
    for j, d in enumerate(datasets):
        ax.bar([x + j * width for x in range(len(snames))],
               [100 * budget["sites"][s]["clip"].get(d, 0) for s in snames], width, label=d)  # fmt: skip
    ax.set_xticks(list(range(len(snames))), snames, rotation=90, fontsize=6)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("activations clipped (%, > scale/2 outside the grid)")
    ax.legend(fontsize=7)
    fig.suptitle(
        f"QBNN error budget ({budget['mc_samples']} MC samples, seed {budget['seed']}): a weights, b sampling, "
        "c activations (Shapley shares), kernel = QBNN - emulation"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _json_safe(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def load_run(run_dir: str | Path) -> tuple[nn.Module, nn.Module, Any, dict, dict]:
    """(bnn, qbnn, datamodule, ood loaders, config) of a finished `python -m qbdl.run` output directory."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from qbdl.bayes import dnn_to_bnn
    from qbdl.quant import load_qbnn
    from qbdl.stages import build_ood_loaders, load_state

    run_dir = Path(run_dir)
    res_file = run_dir / "results.json"
    if not res_file.is_file():
        raise FileNotFoundError(
            f"{res_file} does not exist: give the output directory of a finished qbdl.run"
        )
    cfg = OmegaConf.create(json.loads(res_file.read_text())["config"])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    for k in ("weights", "weights_path"):  # the BNN state replaces every weight: never fetch pretrained ones
        if k in model_cfg:
            model_cfg[k] = None
    dnn = instantiate(model_cfg, num_classes=dm.num_classes, in_chans=dm.spec.in_chans)
    bnn = dnn_to_bnn(dnn, **OmegaConf.to_container(cfg.bayes, resolve=True))
    load_state(bnn, run_dir / "bnn.safetensors")
    qbnn = load_qbnn(str(run_dir / "models" / "qbnn.qbdl"))
    return bnn.eval(), qbnn, dm, build_ood_loaders(cfg, dm), OmegaConf.to_container(cfg, resolve=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: error budget of a finished run; writes RUN_DIR/fidelity.json and fidelity.png, prints a table."""
    ap = argparse.ArgumentParser(prog="python -m qbdl.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "run_dir", help="output directory of python -m qbdl.run (results.json, bnn.safetensors, models/)"
    )
    ap.add_argument("--mc-samples", type=int, default=None, help="default: the run's eval.mc_samples")
    ap.add_argument("--seed", type=int, default=None, help="default: the run's eval.seed")
    ap.add_argument("--floor-seeds", type=int, default=3, help="extra BNN seeds for the MC noise floor")
    ap.add_argument("--max-batches", type=int, default=None, help="first B batches of each set only")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="output directory (default: RUN_DIR)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        bnn, qbnn, dm, ood, cfg = load_run(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ev = cfg.get("eval", {})
    budget = error_budget(
        bnn,
        qbnn,
        dm.test_dataloader(),
        ood,
        mc_samples=args.mc_samples or int(ev.get("mc_samples", 8)),
        seed=args.seed if args.seed is not None else int(ev.get("seed", 0)),
        floor_seeds=args.floor_seeds,
        n_bins=int(ev.get("n_bins", 15)),
        score=str(ev.get("score", "entropy")),
        max_batches=args.max_batches,
        progress=lambda s: print(f"  evaluating {s}", file=sys.stderr, flush=True),
    )
    from qbdl.machine import machine_info

    budget["machine"] = machine_info()
    budget["run_dir"] = str(Path(args.run_dir).resolve())
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    from qbdl.io import atomic_write_json

    atomic_write_json(out / "fidelity.json", _json_safe(budget))
    plot_budget(budget, out / "fidelity.png")
    print(format_budget(budget))
    print(f"wrote {out / 'fidelity.json'} and {out / 'fidelity.png'} ({budget['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
