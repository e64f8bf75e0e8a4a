"""Say the cost before paying it: a short timed probe of each stage and variant, scaled to the whole run.

At start-up the actual model runs a few training steps (DNN and BNN), PTQ on one calibration batch, and one
evaluation batch of every variant (the INT8 ones from that probe's conversion), each timed after a warm-up;
the per-batch times are multiplied by the run's batch counts, epochs, MC samples and set sizes. What the
estimate leaves out: data loading (the probe reuses one batch), checkpointing, plots and the report.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qbdl import quant
from qbdl.bayes import bayesian_layers, dnn_to_bnn, elbo_loss, mc_logits, sampling


def _seconds(fn: Callable[[], Any], reps: int = 2) -> float:
    """Median wall time of `reps` calls after one warm-up call (packing, allocator, lazy init)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def limited(n: int, limit: int | float | None) -> int:
    """Batches per epoch under Lightning's limit_*_batches (an int caps, a float is a fraction)."""
    if limit is None:
        return n
    if isinstance(limit, float) and limit <= 1.0:
        return int(n * limit)
    return min(n, int(limit))


def _train_step_seconds(model: nn.Module, x: Tensor, y: Tensor, n_train: int) -> float:
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-9)
    bayesian = bool(bayesian_layers(model))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = elbo_loss(logits, y, model, n_train) if bayesian else F.cross_entropy(logits, y)
        loss.backward()
        opt.step()

    return _seconds(step)


@torch.no_grad()
def _forward_seconds(model: nn.Module, x: Tensor, device: str) -> float:
    model = copy.deepcopy(model).eval().to(device)
    x = x.to(device)
    return _seconds(lambda: mc_logits(model, x, 1, seed=0))


def estimate_run(
    *,
    dnn: nn.Module,
    train_batch: tuple[Tensor, Tensor],
    eval_batch: Tensor,
    n_train: int,
    dnn_steps: int,
    bnn_steps: int,
    val_images: int,
    val_mc_samples: int,
    bayes: Mapping[str, Any],
    quant_options: Mapping[str, Any] | None,
    quantize_dnn: bool,
    variants: list[str],
    mc_samples: int,
    images: Mapping[str, int],
    device: str = "cpu",
) -> dict[str, Any]:
    """Expected seconds of the fits, the calibration and each variant's evaluation, from a timed probe.

    images: the evaluation's image counts {'test', 'ood', 'val', 'shift'}; dnn_steps / bnn_steps: optimizer
    steps of each fit; val_images: validation images per BNN epoch times its epochs.
    """
    t_probe = time.perf_counter()
    x, y = train_batch
    bnn = dnn_to_bnn(copy.deepcopy(dnn), **bayes)
    per_batch = {
        "dnn_train_step": _train_step_seconds(dnn, x, y, n_train) if dnn_steps else 0.0,
        "bnn_train_step": _train_step_seconds(bnn, x, y, n_train) if bnn_steps else 0.0,
    }
    fwd = {"dnn": _forward_seconds(dnn, eval_batch, device)}
    fwd["bnn"] = _forward_seconds(bnn, eval_batch, device)
    with sampling(bnn, "mean"):
        fwd["bnn_mean"] = _forward_seconds(bnn, eval_batch, device)
    calibration = 0.0
    if quant_options is not None:
        opts = quant.PTQOptions(**quant_options)
        # the real PTQ stages on one batch and one MC pass, scaled to the run's calibration passes
        probe = dataclasses.replace(opts, calib_batches=1, mc_samples=1, seed=0)
        calib_x = x.cpu()
        models = {"qbnn": bnn} | ({"qdnn": dnn} if quantize_dnn else {})
        for name, model in models.items():
            t0 = time.perf_counter()
            prepared = probe.prepare(copy.deepcopy(model).cpu().eval())
            t1 = time.perf_counter()
            probe.calibrate(prepared, [calib_x])
            t2 = time.perf_counter()
            q = probe.convert(prepared)
            t3 = time.perf_counter()
            calibration += (t1 - t0) + (t2 - t1) * (opts.calib_batches or 1) * opts.mc_samples + (t3 - t2)
            fwd[name] = _forward_seconds(q, eval_batch, "cpu")
    per_image = {v: t / eval_batch.shape[0] for v, t in fwd.items()}
    evaluation: dict[str, float] = {}
    for base in dict.fromkeys(v.removesuffix("_ts") for v in variants):
        if base not in per_image:
            continue
        samples = mc_samples if base in ("bnn", "qbnn") else 1
        n = images["test"] + images["ood"] + images["shift"]
        if f"{base}_ts" in variants:
            n += images["val"]
        evaluation[base] = per_image[base] * samples * n
    seconds = {
        "dnn_fit": per_batch["dnn_train_step"] * dnn_steps,
        "bnn_fit": per_batch["bnn_train_step"] * bnn_steps + per_image["bnn"] * val_mc_samples * val_images,
        "calibration": calibration,
        "evaluation": evaluation,
    }
    seconds["total"] = seconds["dnn_fit"] + seconds["bnn_fit"] + calibration + sum(evaluation.values())
    return {
        "seconds": seconds,
        "per_image_forward": per_image,
        "per_batch": per_batch,
        "images": dict(images),
        "probe_seconds": time.perf_counter() - t_probe,
    }


def _fmt(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def format_estimate(est: Mapping[str, Any]) -> str:
    """One line per stage and variant: the expected wall time on this machine."""
    s = est["seconds"]
    lines = [f"expected wall time on this machine (probe took {est['probe_seconds']:.1f} s):"]
    for k in ("dnn_fit", "bnn_fit", "calibration"):
        lines.append(f"  {k:<20} {_fmt(s[k])}")
    for v, t in s["evaluation"].items():
        lines.append(f"  evaluate {v:<11} {_fmt(t)}")
    lines.append(f"  {'total':<20} {_fmt(s['total'])}")
    return "\n".join(lines)


def estimate_for_config(cfg: Any, dm: Any, dnn: nn.Module, ood_loaders: Mapping[str, Any]) -> dict[str, Any]:
    """estimate_run with qbdl.run's config: its epochs, batch limits, variants, sets and PTQ options."""
    train = dm.train_dataloader()
    x, y = next(iter(train))
    test_loader = dm.test_dataloader()
    val_loader = dm.val_dataloader()
    eval_x = next(iter(val_loader))[0]  # an evaluation-sized batch; the probe never reads test images
    limit_train = cfg.trainer.get("limit_train_batches")
    limit_val = cfg.trainer.get("limit_val_batches")
    steps = limited(len(train), limit_train)
    val_images = min(len(val_loader.dataset), limited(len(val_loader), limit_val) * val_loader.batch_size)
    dnn_epochs = 0 if (cfg.dnn.checkpoint or cfg.dnn.max_epochs <= 0) else cfg.dnn.max_epochs
    shift_images = 0
    if cfg.get("shift") and cfg.shift.get("corruptions"):
        n_sets = len(cfg.shift.corruptions) * len(cfg.shift.severities)
        n_test = len(test_loader.dataset)
        shift_images = n_sets * min(n_test, cfg.shift.get("max_items") or n_test)
    quant_options = None
    if cfg.get("quant"):
        quant_options = {k: cfg.quant[k] for k in quant.PTQ_OPTIONS if k in cfg.quant}
    accel = str(cfg.trainer.get("accelerator", "cpu"))
    device = "cuda" if accel in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu"
    return estimate_run(
        dnn=dnn,
        train_batch=(x, y),
        eval_batch=eval_x,
        n_train=len(dm.dataset("train")),
        dnn_steps=steps * dnn_epochs,
        bnn_steps=steps * cfg.bnn.max_epochs,
        val_images=val_images * cfg.bnn.max_epochs,
        val_mc_samples=cfg.bnn.val_mc_samples,
        bayes=dict(cfg.bayes),
        quant_options=quant_options,
        quantize_dnn=bool(cfg.get("quant") and cfg.quant.quantize_dnn),
        variants=list(cfg.eval.variants),
        mc_samples=cfg.eval.mc_samples,
        images={
            "test": len(test_loader.dataset),
            "ood": sum(len(ld.dataset) for ld in ood_loaders.values()),
            "val": len(val_loader.dataset),
            "shift": shift_images,
        },
        device=device,
    )


__all__ = ["estimate_for_config", "estimate_run", "format_estimate", "limited"]
