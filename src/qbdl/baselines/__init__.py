"""Baselines beside the (Q)BNN: deep ensembles, MC dropout and last-layer Laplace, each FP32 and INT8.

Framework-free (no Lightning, no Hydra): the models and their maths. qbdl.baselines.stage trains and
quantizes them inside an experiment.
"""

from qbdl.experiment.memory import resident_bytes

from .ensemble import Ensemble
from .laplace import LastLayerLaplace, fit_last_layer_laplace
from .mcdropout import MCDropout, QDropout, add_mc_dropout, int8_dropout

__all__ = [
    "Ensemble",
    "LastLayerLaplace",
    "MCDropout",
    "QDropout",
    "add_mc_dropout",
    "fit_last_layer_laplace",
    "int8_dropout",
    "resident_bytes",
]
