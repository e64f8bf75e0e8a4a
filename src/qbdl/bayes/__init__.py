"""Bayesian layers, dnn_to_bnn with empirical-Bayes (MOPED) priors, KL/ELBO and MC prediction."""

from .bank import WeightBank
from .convert import PRIORS, bayesian_layers, dnn_to_bnn
from .layers import (
    ESTIMATORS,
    MODES,
    BayesianConv1d,
    BayesianConv2d,
    BayesianConv3d,
    BayesianLayer,
    BayesianLinear,
)
from .loss import elbo_loss, elbo_terms, kl_divergence
from .predict import mc_logits, mc_predict, sample_seed, sampling, set_mc_index

__all__ = [
    "ESTIMATORS",
    "MODES",
    "PRIORS",
    "BayesianConv1d",
    "BayesianConv2d",
    "BayesianConv3d",
    "BayesianLayer",
    "BayesianLinear",
    "WeightBank",
    "bayesian_layers",
    "dnn_to_bnn",
    "elbo_loss",
    "elbo_terms",
    "kl_divergence",
    "mc_logits",
    "mc_predict",
    "sample_seed",
    "sampling",
    "set_mc_index",
]
