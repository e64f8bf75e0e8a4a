"""FP32 stand-ins of the INT8 graph's modules whose quantization parts switch on separately."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qbdl.bayes.layers import BayesianLayer, random_signs
from qbdl.quant.activations import QAdd, Quantize
from qbdl.quant.fold import bn_scale_shift
from qbdl.quant.layers import QuantLayer
from qbdl.quant.prepared import PreparedLayer, channel_dim


def fake_quant(x: Tensor, scale: float, zp: int, qmax: int) -> Tensor:
    """x fake-quantized per tensor on the uint8 grid (scale, zero point zp, values 0..qmax)."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, qmax)


def channel_view(t: Tensor, ndim: int, dim: int = 0) -> Tensor:
    """A per-channel vector viewed to broadcast along dimension `dim` of an ndim-dimensional tensor."""
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(shape)


class Site(nn.Module):
    """An activation the INT8 graph quantizes: fake-quant when `activations` is on; optional statistics."""

    site_kind = "site"

    def __init__(self, name: str, scale: float, zp: int, qmax: int) -> None:
        super().__init__()
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
            err = (yd - fake_quant(yd, self.scale, self.zp, self.qmax)).double()
            st = self.stats.setdefault(self.site_name, [0.0, 0.0, 0, 0, 0])
            st[0] += float(yd.double().pow(2).sum())
            st[1] += float(err.pow(2).sum())
            st[2] += int((yd < lo).sum())
            st[3] += int((yd > hi).sum())
            st[4] += yd.numel()
        return fake_quant(y, self.scale, self.zp, self.qmax) if self.activations else y


class AblationQuant(Site):
    site_kind = "input"

    def __init__(self, name: str, q: Quantize) -> None:
        super().__init__(name, q.scale, q.zero_point, q.qmax)

    def forward(self, x: Tensor) -> Tensor:
        return self._out(x)


class AblationAdd(Site):
    site_kind = "add"

    def __init__(self, name: str, relu: bool, q: QAdd) -> None:
        super().__init__(name, q.scale, q.zero_point, q.qmax)
        self.relu = bool(relu)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a + b
        if self.relu:
            y = F.relu(y)
        return self._out(y)


class Requant(AblationQuant):
    """After an average pool: the INT8 pool rounds its mean to its input's grid (no statistics: _sites skips it)."""

    site_kind = "pool"

    def __init__(self, name: str, src: Site) -> None:
        Site.__init__(self, name, src.scale, src.zp, src.qmax)


def int8_sample(q: QuantLayer) -> tuple[Tensor, Tensor | None]:
    """The dequantized int8 weight sample and float bias the QuantLayer computes with for this forward.

    Its sampler draws the layer's random numbers from the global generator exactly as its own forward (or the
    prefetch hook) does; samplers without one weight sample shared by the batch raise NotImplementedError.
    """
    wq, bias = q.int8_sample()
    return wq.float() * channel_view(q.w_scale.float(), wq.dim()), bias


class AblationLayer(Site):
    """A conv/linear (+BN, +ReLU) whose weights, sampling and output quantization are switched separately."""

    site_kind = "layer"

    def __init__(
        self, name: str, orig: nn.Module, bn: nn.Module | None, prep: PreparedLayer, q: QuantLayer
    ) -> None:
        super().__init__(name, q.out_scale, q.out_zp, q.qmax)
        self.orig, self.bn, self.prep, self.q = orig, bn, prep, q
        self.relu = prep.relu
        self.bayesian = isinstance(orig, BayesianLayer)
        if self.bayesian != q.bayesian:
            raise ValueError(
                f"{name}: the QBNN layer is {'' if q.bayesian else 'not '}Bayesian, the BNN's is"
            )
        self.weights = self.sampling = False
        self.input_site: Site | None = None  # set by ablation_model: the network-input site it reads
        self.feeds_output = False  # ... and whether its output is the network's (the logits)
        self.exact_sigma = False  # (a) with the BNN's own sigma: what a lossless sigma grid would change
        self.drawn: tuple[Tensor, Tensor | None] | None = None  # set by the draw hook
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
            self.register_buffer("mu_deq", q.mu_q.float() * channel_view(q.mu_scale, nd))
            self.register_buffer("bias_deq", None if q.bias_q is None else q.bias_q.float() * q.bias_scale)
            if (self.bias_fold is None) != (self.bias_deq is None):
                raise ValueError(f"{name}: the BNN and the QBNN disagree on having a bias")
            self.register_buffer("sgn", channel_view(sgn, nd))
            self.register_buffer("sgn_b", sgn)
            self.register_buffer(
                "sigma_fold", folded.sigma_weight.detach().float().clone() if self.bayesian else None
            )
            self.register_buffer(
                "sigma_deq", q.sigma_q.float() * channel_view(q.sigma_scale, nd) if self.bayesian else None
            )
            bs = None
            if self.bayesian and q.bias_sigma_q is not None:
                bs = q.bias_sigma_q.float() * q.bias_scale
            self.register_buffer("bias_sigma_deq", bs)

    def layer_mode(self) -> str:
        """The BNN layer's sampling mode ('mean' for deterministic layers); not `mode`, which sampling() sets."""
        return self.orig.mode if self.bayesian else "mean"

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return self.prep.op(x, w, b)

    def _sigma(self) -> Tensor:
        return self.sigma_fold if self.exact_sigma else self.sigma_deq

    def _folded(self, x: Tensor) -> Tensor:
        a, b = self.weights, self.sampling
        if not self.bayesian or self.layer_mode() == "mean":
            return self._op(x, self.mu_deq if a else self.mu_fold, self.bias_deq if a else self.bias_fold)
        if b:
            if self.drawn is None:
                raise RuntimeError(
                    f"{self.site_name}: no int8 sample drawn (run the ablation model's forward)"
                )
            wq, bq = self.drawn
            self.drawn = None
            if a:
                return self._op(x, wq, bq)
            w = self.mu_fold + (wq - self.mu_deq)
            bias = None if bq is None else self.bias_fold + (bq - self.bias_deq)
            return self._op(x, w, bias)
        # (a) alone: FP32 Gaussian sampling around the int8 grid values, with the BNN's random numbers in its
        # order; sign(BN scale) maps them onto the folded layer (fold: sigma' = |s| sigma, sample' = s sample).
        orig = self.orig
        if orig.estimator == "reparameterization":
            w = self.mu_deq + self.sgn * self._sigma() * torch.randn_like(orig.mu_weight)
            bias = self.bias_deq
            if orig.mu_bias is not None:
                bias = bias + self.sgn_b * self.bias_sigma_deq * torch.randn_like(orig.mu_bias)
            return self._op(x, w, bias)
        out = self._op(x, self.mu_deq, self.bias_deq)  # flipout: the same calls as BayesianLayer._flipout
        delta_w = self.sgn * self._sigma() * torch.randn_like(orig.mu_weight)
        delta_b = None
        if orig.mu_bias is not None:
            delta_b = self.sgn_b * self.bias_sigma_deq * torch.randn_like(orig.mu_bias)
        ch = channel_dim(orig)
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
