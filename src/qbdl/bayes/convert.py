"""dnn_to_bnn: turn a deterministic network into a Bayesian one with an empirical-Bayes (MOPED) prior."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .layers import BayesianConv1d, BayesianConv2d, BayesianConv3d, BayesianLayer, BayesianLinear

PRIORS = ("moped", "normal")
_CONV = {nn.Conv1d: BayesianConv1d, nn.Conv2d: BayesianConv2d, nn.Conv3d: BayesianConv3d}


_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def custom_forward_base(layer: nn.Module) -> type[nn.Module] | None:
    """The torch base class of a Conv/Linear subclass whose own forward (or _conv_forward) replaces the plain op."""
    for base in _BASES:
        if isinstance(layer, base):
            cls = type(layer)
            if cls.forward is not base.forward:
                return base
            if getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None):
                return base
    return None


def refuse_custom_forward(name: str, layer: nn.Module, what: str) -> None:
    """Raise a clear error for a Conv/Linear subclass with its own forward (its twin would compute another function)."""
    base = custom_forward_base(layer)
    if base is None:
        return
    raise NotImplementedError(
        f"{what}: layer {name!r} is a {type(layer).__name__}, an nn.{base.__name__} subclass with a forward of "
        f"its own (e.g. 'same' padding from the input size, weight standardisation, a scaled weight); its "
        f"replacement would run the plain nn.{base.__name__} op and compute a different function. Put "
        f"{name!r} in exclude=(...) to keep it deterministic (dnn_to_bnn), or replace it by a plain "
        f"nn.{base.__name__} whose weights give the same function before converting."
    )


def _bayesian_twin(layer: nn.Module, estimator: str) -> BayesianLayer | None:
    if isinstance(layer, nn.Linear):
        return BayesianLinear(layer.in_features, layer.out_features, layer.bias is not None, estimator)
    for base, cls in _CONV.items():
        if isinstance(layer, base):
            if layer.transposed if hasattr(layer, "transposed") else False:
                return None
            return cls(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
                layer.bias is not None,
                layer.padding_mode,
                estimator,
            )
    return None


def dnn_to_bnn(
    model: nn.Module,
    *,
    estimator: str = "reparameterization",
    prior: str = "moped",
    prior_sigma: float = 1.0,
    moped_delta: float = 0.05,
    posterior_rho_init: float = -3.0,
    sigma_floor: float = 1e-6,
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Return a Bayesian copy of `model` (input untouched): every Conv/Linear not named in `exclude` replaced.

    prior="moped": prior N(w, prior_sigma^2), posterior N(w, (moped_delta*|w|)^2) floored at sigma_floor.
    prior="normal": prior N(0, prior_sigma^2), posterior mean from a fresh default init, rho=posterior_rho_init.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
    if prior_sigma <= 0:
        raise ValueError(f"prior_sigma must be > 0, got {prior_sigma}")
    if prior == "moped" and moped_delta <= 0:
        raise ValueError(f"moped_delta must be > 0, got {moped_delta}")
    exclude = set(exclude)
    names = {name for name, _ in model.named_modules()}
    unknown = exclude - names
    if unknown:
        raise ValueError(
            f"exclude names {sorted(unknown)} are not modules of the model; see model.named_modules()"
        )
    bnn = copy.deepcopy(model)
    for name, module in list(bnn.named_modules()):
        if name in exclude or not name:
            continue
        twin = _bayesian_twin(module, estimator)
        if twin is None:
            continue
        refuse_custom_forward(name, module, "dnn_to_bnn")
        twin = twin.to(device=module.weight.device, dtype=module.weight.dtype)
        w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
        if prior == "moped":
            twin.set_prior(w, prior_sigma, b, prior_sigma)
            floor = torch.tensor(sigma_floor, dtype=w.dtype, device=w.device)
            twin.set_posterior(
                w,
                torch.maximum(moped_delta * w.abs(), floor),
                b,
                None if b is None else torch.maximum(moped_delta * b.abs(), floor),
            )
        else:
            twin.reset_parameters(posterior_rho_init)
            twin.set_prior(
                torch.zeros_like(w), prior_sigma, None if b is None else torch.zeros_like(b), prior_sigma
            )
        parent_name, _, child = name.rpartition(".")
        parent = bnn.get_submodule(parent_name) if parent_name else bnn
        setattr(parent, child, twin)
    return bnn


def bayesian_layers(model: nn.Module) -> list[BayesianLayer]:
    """All Bayesian layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, BayesianLayer)]
