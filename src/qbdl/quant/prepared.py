"""Prepared (FP32 / fake-quant) wrappers: what prepare() puts in the graph for calibration, QAT and simulate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bayes.layers import BayesianLayer, BayesianLinear
from . import noise
from .observers import ActObserver, fake_quant_act, fake_quant_weight, symmetric_scale


def _chan_view(t: Tensor, dim: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return t.view(shape)


def channel_dim(layer: nn.Module) -> int:
    """The output-channel dimension of a conv/linear's output: -1 for linear layers, 1 for convolutions."""
    return -1 if isinstance(layer, (nn.Linear, BayesianLinear)) else 1


def apply_weights(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """The conv/linear `layer` (Bayesian or not, zero padding) computed with weight `w` and bias `b`."""
    if isinstance(layer, (nn.Linear, BayesianLinear)):
        return F.linear(x, w, b)
    if getattr(layer, "padding_mode", "zeros") != "zeros":  # prepare refuses these layers
        raise NotImplementedError(f"padding_mode {layer.padding_mode!r} is not quantizable")
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(layer.kernel_size) - 1]
    return conv(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


class _Observed(nn.Module):
    obs: ActObserver
    fq_bits: int | None
    act_qmax: int = 255  # the INT8 graph's activation range (kernel plan): fake quant uses the same grid

    def _fq_act(self, y: Tensor) -> Tensor:
        return fake_quant_act(y, self.obs, min(self.fq_bits, self.act_qmax.bit_length()))

    def _observe(self, y: Tensor) -> Tensor:
        # Ranges move during calibration (FP32) and QAT training, never while evaluating a fake-quant model.
        if self.fq_bits is None or self.training:
            return self.obs(y)
        return y


class PreparedLayer(_Observed):
    """A BN-folded conv/linear (Bayesian or plain) with optional fused ReLU and an output observer.

    fq_bits=None: FP32 forward (calibration). fq_bits=b: fake-quantized forward (QAT / simulate): mu, sigma
    and the sampled weight per-channel symmetric b-bit, the output unsigned b-bit, straight-through grads.
    per_example (Bayesian layers): calibration also records the ranges of INT8 Flipout's two terms, the
    mean-weight output (before ReLU) and the sign-flipped perturbation (weight and bias noise).
    """

    def __init__(
        self, layer: nn.Module, det_bias: Tensor | None, relu: bool, observer: str, per_example: bool = False
    ) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("det_bias", det_bias)
        self.relu = relu
        self.obs = ActObserver(observer)
        self.fq_bits: int | None = None
        per_example = per_example and isinstance(layer, BayesianLayer)
        self.obs_mean = ActObserver(observer) if per_example else None
        self.obs_pert = ActObserver(observer) if per_example else None

    def _observe_flipout(self, x: Tensor) -> None:
        layer = self.layer
        y = self.op(x, layer.mu_weight, layer.mu_bias)
        if self.det_bias is not None:
            y = y + _chan_view(self.det_bias, channel_dim(layer), y.dim())
        self.obs_mean(y)
        self.obs_pert(layer.flipout_perturbation(x))

    @property
    def bayesian(self) -> bool:
        """True when the wrapped layer is a Bayesian layer."""
        return isinstance(self.layer, BayesianLayer)

    def op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The wrapped conv/linear computed with weight `w` and bias `b` (no BN, ReLU or observer)."""
        return apply_weights(self.layer, x, w, b)

    def _fq_forward(self, x: Tensor) -> Tensor:
        bits = self.fq_bits
        layer = self.layer
        if not isinstance(layer, BayesianLayer):
            return self.op(
                x, fake_quant_weight(layer.weight, symmetric_scale(layer.weight, bits), bits), layer.bias
            )
        mu = layer.mu_weight
        mu_q = fake_quant_weight(mu, symmetric_scale(mu, bits), bits)
        if layer.mode == "mean":
            return self.op(x, mu_q, layer.mu_bias)
        # Flipout and reparameterization both fake-quantize one shared weight sample (what INT8 runs).
        sigma = layer.sigma_weight
        sig_q = fake_quant_weight(sigma, symmetric_scale(sigma, bits), bits)
        w = mu_q + sig_q * torch.randn_like(mu)
        s_w = noise.sample_scale(mu_q.detach(), sig_q.detach()) * 127 / (2 ** (bits - 1) - 1)
        w = fake_quant_weight(w, s_w, bits)
        b = layer.mu_bias
        if b is not None:
            b = b + layer.sigma_bias * torch.randn_like(b)
        return self.op(x, w, b)

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.obs_mean is not None
            and self.fq_bits is None
            and self.obs.enabled
            and self.layer.mode == "sample"
        ):
            self._observe_flipout(x)
        y = self.layer(x) if self.fq_bits is None else self._fq_forward(x)
        if self.det_bias is not None:
            y = y + _chan_view(self.det_bias, channel_dim(self.layer), y.dim())
        if self.relu:
            y = F.relu(y)
        y = self._observe(y)
        return y if self.fq_bits is None else self._fq_act(y)


class ObservedQuant(_Observed):
    """Where FP32 input becomes INT8: observes (and in fake-quant mode quantizes) the input."""

    def __init__(self, observer: str) -> None:
        super().__init__()
        self.obs = ActObserver(observer)
        self.fq_bits: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = self._observe(x)
        return x if self.fq_bits is None else self._fq_act(x)


class ObservedAdd(_Observed):
    """Residual add (optionally fused with ReLU) with an output observer."""

    def __init__(self, relu: bool, observer: str) -> None:
        super().__init__()
        self.relu = relu
        self.obs = ActObserver(observer)
        self.fq_bits: int | None = None

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a + b
        if self.relu:
            y = F.relu(y)
        y = self._observe(y)
        return y if self.fq_bits is None else self._fq_act(y)


class DeQuantMarker(nn.Module):
    """Where INT8 activations go back to FP32 (identity before conversion)."""

    def forward(self, x: Tensor) -> Tensor:
        return x
