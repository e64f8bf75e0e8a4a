"""KL divergence and the ELBO loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import BayesianLayer


def kl_divergence(model: nn.Module) -> Tensor:
    """Closed-form Gaussian KL(q || p) summed over every parameter of every Bayesian layer."""
    terms = [m.kl() for m in model.modules() if isinstance(m, BayesianLayer)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def elbo_terms(logits: Tensor, target: Tensor, model: nn.Module, n_train: int, beta: float = 1.0) -> dict:
    """The two ELBO terms and their sum: loss = CE_mean + beta * KL_sum / n_train."""
    if n_train <= 0:
        raise ValueError(f"n_train must be the (positive) number of training examples, got {n_train}")
    nll = F.cross_entropy(logits, target)
    kl = kl_divergence(model).to(nll.device)
    return {"loss": nll + beta * kl / n_train, "nll": nll, "kl": kl}


def elbo_loss(logits: Tensor, target: Tensor, model: nn.Module, n_train: int, beta: float = 1.0) -> Tensor:
    """Negative ELBO per example: cross-entropy mean + beta * KL_sum / n_train."""
    return elbo_terms(logits, target, model, n_train, beta)["loss"]
