"""qbdl's own random draws as the exported graph's noise inputs, so the two can be compared on the same samples."""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from qbdl.bayes.predict import sample_seed, set_mc_index

from .graph import NoiseLayout
from .qdq import layer_attr


def qbdl_noise(model: fx.GraphModule, layout: NoiseLayout, batch: int, samples: int, seed: int) -> dict:
    """`signs` [S*N, T] and `bias_noise` [S, B] equal to what qbdl.bayes.mc_logits(model, x, S, seed) draws.

    Replays the 'flipout' sampler's draws (samplers.FlipoutSampler.forward: s_in, s_out, then the layer's
    _draw: sign and bias noise) under each MC sample's seed, layer by layer in graph order, so that the exported
    model fed these inputs computes the same samples as qbdl's engine.
    """
    signs = np.empty((samples * batch, layout.sign_cols), np.float32)
    bias = np.zeros((samples, max(layout.bias_cols, 1)), np.float32)
    mods = dict(model.named_modules())
    try:
        for s in range(samples):
            set_mc_index(model, s)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(seed, s))
                for e in layout.layers:
                    q = mods[e["name"]]
                    for key in ("s_in", "s_out"):
                        a, b = e[key]
                        draw = torch.randint(0, 2, (batch, b - a), dtype=torch.int8).mul_(2).sub_(1)
                        signs[s * batch : (s + 1) * batch, a:b] = draw.numpy()
                    _, _, eps_b = layer_attr(q, "draw", "_draw")(None)
                    if e["bias"] is not None:
                        bias[s, e["bias"][0] : e["bias"][1]] = eps_b.numpy()
    finally:
        set_mc_index(model, None)
    out = {"signs": signs}
    if layout.bias_cols:
        out["bias_noise"] = bias
    return out
