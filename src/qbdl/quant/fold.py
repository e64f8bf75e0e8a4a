"""Exact BatchNorm folding into (Bayesian) convolutions and linear layers (eval statistics)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..bayes.layers import BayesianLayer, softplus_inv

#: The BatchNorm classes prepare() folds into the conv/linear before them (eval statistics).
BATCH_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d,
)  # fmt: skip


def bn_scale_shift(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(s, t) with bn(y) = s*y + t in eval mode: s = gamma/sqrt(var+eps), t = beta - s*running_mean."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn} has no running statistics (track_running_stats=False): it cannot be folded")
    var, mean = bn.running_var.detach(), bn.running_mean.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    return s, beta - s * mean


def _per_out(s: Tensor, w: Tensor) -> Tensor:
    return s.view(-1, *[1] * (w.dim() - 1))


@torch.no_grad()
def fold_bn(layer: nn.Module, bn: nn.Module) -> tuple[nn.Module, Tensor | None]:
    """Fold `bn` into a copy of `layer`; returns (folded layer, deterministic bias or None).

    Bayesian layer: mu' = s*mu, sigma' = |s|*sigma, priors scaled the same way (so the KL is unchanged);
    a Bayesian bias becomes s*(b - running_mean) + beta with sigma |s|*sigma_b. Without a bias the BN
    shift is returned as a deterministic bias (BN stays deterministic). Plain conv/linear: w' = s*w,
    b' = s*(b - running_mean) + beta.
    """
    s, t = bn_scale_shift(bn)
    new = copy.deepcopy(layer)
    if isinstance(layer, BayesianLayer):
        w = layer.mu_weight
        sa = _per_out(s.abs(), w)
        new.mu_weight.copy_(_per_out(s, w) * layer.mu_weight)
        new.rho_weight.copy_(softplus_inv(sa * layer.sigma_weight))
        new.prior_mu_weight.copy_(_per_out(s, w) * layer.prior_mu_weight)
        new.prior_sigma_weight.copy_(sa * layer.prior_sigma_weight)
        # the copied sigma cache needs no reset: its entries are keyed by the original rho's storage, never the copy's
        if layer.mu_bias is None:
            return new, t.clone()
        new.mu_bias.copy_(s * layer.mu_bias + t)
        new.rho_bias.copy_(softplus_inv(s.abs() * layer.sigma_bias))
        new.prior_mu_bias.copy_(s * layer.prior_mu_bias + t)
        new.prior_sigma_bias.copy_(s.abs() * layer.prior_sigma_bias)
        return new, None
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        raise TypeError(f"cannot fold BatchNorm into {type(layer).__name__}")
    new.weight.copy_(_per_out(s, layer.weight) * layer.weight)
    bias = t if layer.bias is None else s * layer.bias + t
    new.bias = nn.Parameter(bias.clone())
    return new, None
