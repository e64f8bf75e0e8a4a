"""Mean-field Gaussian Bayesian layers (reparameterization and Flipout estimators)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ESTIMATORS = ("reparameterization", "flipout")
MODES = ("sample", "mean")


def softplus_inv(x: Tensor) -> Tensor:
    """Inverse of softplus: rho such that softplus(rho) = x (x > 0)."""
    return x + torch.log(-torch.expm1(-x))


class BayesianLayer(nn.Module):
    """Base class: Gaussian posterior N(mu, softplus(rho)^2) and prior N(prior_mu, prior_sigma^2) per weight.

    Priors are persistent buffers so they survive a state_dict round trip.
    """

    estimator: str
    mode: str
    _channel_dim = 1

    def _init_bayes(self, weight_shape: tuple[int, ...], bias: bool, estimator: str) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
        self.estimator = estimator
        self.mode = "sample"
        self.mu_weight = nn.Parameter(torch.empty(weight_shape))
        self.rho_weight = nn.Parameter(torch.empty(weight_shape))
        self.register_buffer("prior_mu_weight", torch.zeros(weight_shape))
        self.register_buffer("prior_sigma_weight", torch.ones(weight_shape))
        if bias:
            n_out = weight_shape[0]
            self.mu_bias = nn.Parameter(torch.empty(n_out))
            self.rho_bias = nn.Parameter(torch.empty(n_out))
            self.register_buffer("prior_mu_bias", torch.zeros(n_out))
            self.register_buffer("prior_sigma_bias", torch.ones(n_out))
        else:
            self.register_parameter("mu_bias", None)
            self.register_parameter("rho_bias", None)
            self.register_buffer("prior_mu_bias", None)
            self.register_buffer("prior_sigma_bias", None)
        self._sigma_cache: dict[str, tuple[int, Tensor]] = {}

    def _sigma(self, name: str) -> Tensor:
        """softplus(rho); cached while rho is unchanged and no gradient is needed (eval)."""
        rho: Tensor = getattr(self, f"rho_{name}")
        if torch.is_grad_enabled() and rho.requires_grad:
            return F.softplus(rho)
        key = (rho._version, rho.data_ptr())
        hit = self._sigma_cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, F.softplus(rho.detach()))
            self._sigma_cache[name] = hit
        return hit[1]

    @property
    def sigma_weight(self) -> Tensor:
        """Posterior standard deviation of the weight."""
        return self._sigma("weight")

    @property
    def sigma_bias(self) -> Tensor | None:
        """Posterior standard deviation of the bias (None without bias)."""
        return None if self.rho_bias is None else self._sigma("bias")

    def sample_weight(self) -> tuple[Tensor, Tensor | None]:
        """One weight (and bias) sample, or the mean in mode='mean'."""
        if self.mode == "mean":
            return self.mu_weight, self.mu_bias
        w = self.mu_weight + self.sigma_weight * torch.randn_like(self.mu_weight)
        b = None
        if self.mu_bias is not None:
            b = self.mu_bias + self.sigma_bias * torch.randn_like(self.mu_bias)
        return w, b

    def kl(self) -> Tensor:
        """Closed-form KL(q || p) summed over weight and bias."""
        total = _gaussian_kl(self.mu_weight, self.sigma_weight, self.prior_mu_weight, self.prior_sigma_weight)
        if self.mu_bias is not None:
            total = total + _gaussian_kl(
                self.mu_bias, self.sigma_bias, self.prior_mu_bias, self.prior_sigma_bias
            )
        return total

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "mean":
            return self._op(x, self.mu_weight, self.mu_bias)
        if self.estimator == "reparameterization":
            w, b = self.sample_weight()
            return self._op(x, w, b)
        return self._flipout(x)

    def _flipout(self, x: Tensor) -> Tensor:
        # Signs are drawn per example and per channel (Wen et al. 2018): sign-flipping the shared
        # perturbation gives each example its own, identically distributed, weight sample. The bias
        # noise sits inside the sign-flipped term: added unflipped it would be one draw shared by the
        # whole batch, correlating the outputs of different examples.
        out = self._op(x, self.mu_weight, self.mu_bias)
        return out + self.flipout_perturbation(x)

    def flipout_perturbation(self, x: Tensor) -> Tensor:
        """Flipout's sign-flipped term s_out * op(x * s_in, delta_w, delta_b) of one forward."""
        delta_w = self.sigma_weight * torch.randn_like(self.mu_weight)
        delta_b = None if self.mu_bias is None else self.sigma_bias * torch.randn_like(self.mu_bias)
        pert = self._op(x * random_signs(x, self._channel_dim), delta_w, delta_b)
        return pert * random_signs(pert, self._channel_dim)

    def set_prior(
        self, mu_weight: Tensor, sigma_weight: Tensor | float, mu_bias=None, sigma_bias=None
    ) -> None:
        """Set the prior N(mu, sigma^2); sigma may be a scalar."""
        with torch.no_grad():
            self.prior_mu_weight.copy_(mu_weight)
            self.prior_sigma_weight.copy_(torch.as_tensor(sigma_weight).expand_as(self.prior_sigma_weight))
            if self.prior_mu_bias is not None:
                self.prior_mu_bias.copy_(torch.zeros_like(self.prior_mu_bias) if mu_bias is None else mu_bias)
                sb = sigma_weight if sigma_bias is None else sigma_bias
                self.prior_sigma_bias.copy_(torch.as_tensor(sb).expand_as(self.prior_sigma_bias))

    def set_posterior(self, mu_weight: Tensor, sigma_weight: Tensor, mu_bias=None, sigma_bias=None) -> None:
        """Set the posterior mean and standard deviation (sigma > 0)."""
        with torch.no_grad():
            self.mu_weight.copy_(mu_weight)
            self.rho_weight.copy_(softplus_inv(sigma_weight))
            if self.mu_bias is not None:
                self.mu_bias.copy_(mu_bias)
                self.rho_bias.copy_(softplus_inv(sigma_bias))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, estimator={self.estimator}"


def random_signs(t: Tensor, channel_dim: int) -> Tensor:
    """Random +-1 of shape [B, C] broadcastable to t (one sign per example and channel)."""
    shape = [1] * t.dim()
    shape[0] = t.shape[0]
    shape[channel_dim] = t.shape[channel_dim]
    return torch.empty(shape, device=t.device, dtype=t.dtype).bernoulli_(0.5).mul_(2).sub_(1)


def _gaussian_kl(mu_q: Tensor, sigma_q: Tensor, mu_p: Tensor, sigma_p: Tensor) -> Tensor:
    return (
        torch.log(sigma_p) - torch.log(sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5
    ).sum()


class _BayesianConvNd(BayesianLayer):
    _nd = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        estimator: str = "reparameterization",
    ) -> None:
        super().__init__()
        # A throw-away conv normalises kernel_size/stride/padding exactly as torch does.
        ref = getattr(nn, f"Conv{self._nd}d")(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False, padding_mode
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = ref.kernel_size, ref.stride, ref.padding
        self.dilation, self.groups, self.padding_mode = ref.dilation, groups, padding_mode
        self._reversed_padding_repeated_twice = ref._reversed_padding_repeated_twice
        self._init_bayes(tuple(ref.weight.shape), bias, estimator)
        self.reset_parameters()

    def reset_parameters(self, rho_init: float = -3.0) -> None:
        """Kaiming-uniform mean (torch's default conv init) and constant rho."""
        nn.init.kaiming_uniform_(self.mu_weight, a=math.sqrt(5))
        nn.init.constant_(self.rho_weight, rho_init)
        if self.mu_bias is not None:
            fan_in = self.mu_weight[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.mu_bias, -bound, bound)
            nn.init.constant_(self.rho_bias, rho_init)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        conv = getattr(F, f"conv{self._nd}d")
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, w, b, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if any(self.padding) if isinstance(self.padding, tuple) else self.padding:
            s += f", padding={self.padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.mu_bias is None:
            s += ", bias=False"
        return s + f", estimator={self.estimator}"


class BayesianConv1d(_BayesianConvNd):
    """Bayesian 1-d convolution."""

    _nd = 1


class BayesianConv2d(_BayesianConvNd):
    """Bayesian 2-d convolution."""

    _nd = 2


class BayesianConv3d(_BayesianConvNd):
    """Bayesian 3-d convolution."""

    _nd = 3


class BayesianLinear(BayesianLayer):
    """Bayesian fully connected layer."""

    _channel_dim = -1

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, estimator: str = "reparameterization"
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_bayes((out_features, in_features), bias, estimator)
        self.reset_parameters()

    def reset_parameters(self, rho_init: float = -3.0) -> None:
        """Kaiming-uniform mean (torch's default linear init) and constant rho."""
        nn.init.kaiming_uniform_(self.mu_weight, a=math.sqrt(5))
        nn.init.constant_(self.rho_weight, rho_init)
        if self.mu_bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.mu_bias, -bound, bound)
            nn.init.constant_(self.rho_bias, rho_init)

    def _op(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.mu_bias is not None}, estimator={self.estimator}"
        )
