"""The error budget's parts, their combinations and the metrics it splits."""

from __future__ import annotations

import itertools

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
