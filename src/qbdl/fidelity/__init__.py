"""Fidelity error budget: where, and by how much, does a QBNN depart from its FP32 BNN?

    python -m qbdl.fidelity RUN_DIR [--mc-samples S] [--seed N] [--floor-seeds K] [--max-batches B]

For a trained BNN and its INT8 QBNN, with the same MC seeds, the QBNN-vs-BNN gap of accuracy, NLL, UCE,
ECE, Brier and OOD AUROC is split into three parts, each switched on alone and in every combination by
one configurable forward (:func:`ablation_model`), computed in FP32 with fake quantization:

(a) ``weights``: mu and sigma on the converted model's int8 grids (``mu_q * mu_scale``,
    ``sigma_q * sigma_scale``, per output channel, BN folded) and the int32 bias (``bias_q * bias_scale``);
    weight samples are still FP32 Gaussian, with the BNN's own random numbers.
(b) ``sampling``: the QBNN's integer sampling path replaces FP32 Gaussian sampling: the weight perturbation
    of the INT8 sample ``w_int8 * S - mu_q * mu_scale`` (pool noise clamped at +-4 on a 1/64 grid, random
    global sign, fixed-point construction, rounding to the coarser sample grid S = max(|mu| + 3 sigma)/127,
    clamp +-127) and its bias noise, taken from the QuantLayer itself for the same MC index and seed (the
    very int8 weight the INT8 kernel computes with). With (a) on this *is* the INT8 sample; with (a) off the
    perturbation is added to the FP32 mean.
(c) ``activations``: every activation the INT8 graph quantizes (the input, each conv/linear output after
    its fused ReLU, each residual add, average pools, the logits) fake-quantized with the QBNN's calibrated
    scale, zero point and range 0..qmax.

'All off' runs the BNN's own modules (unfolded BN, its random numbers): it equals the FP32 BNN bit for bit.
'All on' is an FP32 emulation of the INT8 QBNN: the same int8 weights and qparams, but FP32 convolution and
rounding instead of int32 accumulation and the kernels' requantization, so single activations can land one
LSB apart (``checks.kernel_layers`` measures it per layer on identical int8 inputs) and such flips propagate;
``checks.all_on_vs_qbnn`` measures the end-to-end logit difference and ``gap[m].kernel_residual`` its effect on
each metric. Hence, exactly: ``qbnn - bnn = sum(shapley) + kernel_residual``.

MC noise: the QBNN draws other random numbers than the BNN (integer pool vs torch Gaussians), so the gap of
two independent MC estimates carries MC noise. ``gap[m].mc_floor`` = mean |metric(BNN, seed i) - metric(BNN,
seed j)| over all pairs of ``1 + floor_seeds`` seeds: a gap not clearly above it is not shown to be
quantization. Configurations with (b) off share the BNN's random numbers (paired, far less MC noise).

Keys of the result (and of RUN_DIR/fidelity.json):
    format, mc_samples, seed, floor_seeds, parts {a, b, c: description}, metrics [names],
    n_test, n_ood {name: n}, qbnn {sampler, backend, activation_qmax},
    configs {none, a, b, c, ab, ac, bc, abc, bnn, qbnn: {metric: value}},
    mixed {name: {fp32_layers, metrics, vs_all_on, gap}}: all parts on except in `fp32_layers` (weights, sampling,
        and the network input / logits they touch left FP32): what mixed precision would recover (default
        first_last_fp32: the first and the last layer),
    sigma_grid {metrics, vs_a}: (a) alone with the BNN's exact sigma, and (a) minus that: the most any finer
        sigma grid (unsigned, log, own scale) could recover,
    floor_values {metric: [value per seed]},
    gap {metric: {bnn, qbnn, gap, emulated, kernel_residual, mc_floor, alone {a,b,c}, leave_one_out {a,b,c},
                  shapley {a,b,c}, interaction}},
    layers {name: {kind, bayesian, mu_sqnr_db, sigma_sqnr_db, bias_sqnr_db, sample_step_over_mu_step,
                   sigma_over_sample_step, sample_noise_var_ratio}},
    sites {name: {kind, scale, zero_point, qmax, range [lo, hi], sqnr_db {data: dB}, clip {data: share},
                  clip_low {data: share}, clip_high {data: share}}}: statistics of the FP32 BNN's activations
        (all parts off, the MC samples of the budget) before quantization on the test set and each OOD set;
        `range` is the INT8 grid [(0 - zp) * scale, (qmax - zp) * scale], a value is clipped when it lies more
        than scale/2 outside it (its error then exceeds rounding's);
    checks {all_off_vs_bnn {max_abs_logit, equal}, all_on_vs_qbnn {max_abs_logit, mean_abs_logit,
            logit_lsb, max_lsb, argmax_agreement}, kernel_layers {name: {mismatch_share, max_lsb}}},
    seconds.
"""

from qbdl.fidelity.ablation import ablation_model, set_parts
from qbdl.fidelity.budget import error_budget, mc_noise_floor, mc_noise_floor_of
from qbdl.fidelity.cli import load_run, main
from qbdl.fidelity.parts import BASE_METRICS, CONFIGS, FORMAT, PARTS
from qbdl.fidelity.render import format_budget, plot_budget

__all__ = [
    "BASE_METRICS",
    "CONFIGS",
    "FORMAT",
    "PARTS",
    "ablation_model",
    "error_budget",
    "format_budget",
    "load_run",
    "main",
    "mc_noise_floor",
    "mc_noise_floor_of",
    "plot_budget",
    "set_parts",
]
