"""Evaluate model variants side by side with the same MC seeds: metrics, predictions, plots."""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor, nn
from tqdm.auto import tqdm

from qbdl import metrics
from qbdl.bayes import mc_logits, sampling
from qbdl.experiment.memory import resident_bytes
from qbdl.experiment.shard import Shard
from qbdl.io import atomic_write_bytes
from qbdl.metrics.registry import computed_metrics
from qbdl.models.files import state_dict_bytes
from qbdl.quant.backend import int8_summary


@dataclass
class Variant:
    """A model to evaluate: `samples` MC passes (1 for a deterministic model); size of its saved weights."""

    name: str
    model: nn.Module
    samples: int
    size_bytes: int
    device: str = "cpu"
    backbone_passes: int | None = None  # full-network passes per image (None: `samples`; last-layer Laplace: 1)


class MeanWeights(nn.Module):
    """The BNN run on its posterior-mean weights: the control for 'Bayesian averaging vs extra training'."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with sampling(self.model, "mean"):
            return self.model(x)


def model_variants(
    bnn: nn.Module,
    mc_samples: int,
    device: str = "cpu",
    reference: nn.Module | None = None,
    quantized: dict[str, tuple[nn.Module, int]] | None = None,
) -> dict[str, Variant]:
    """Every variant a run can evaluate: bnn, bnn_mean, dnn (the reference), and the INT8 models (on the CPU).

    quantized: {name: (converted model, saved file size)}; 'qbnn' is sampled `mc_samples` times, the rest once.
    """
    bnn = bnn.eval()
    out = {
        "bnn": Variant("bnn", bnn, mc_samples, state_dict_bytes(bnn), device),
        "bnn_mean": Variant("bnn_mean", MeanWeights(bnn), 1, state_dict_bytes(bnn), device),
    }
    if reference is not None:
        out["dnn"] = Variant("dnn", reference.eval(), 1, state_dict_bytes(reference), device)
    for name, (model, size) in (quantized or {}).items():
        out[name] = Variant(name, model, mc_samples if name == "qbnn" else 1, size, "cpu")
    return out


@dataclass
class Evaluation:
    """What evaluate_variants returns: metrics, per-example predictions and curves per variant, test MC logits.

    temperatures: {variant: T} of the variants that also got a `<name>_ts` twin (fitted on validation data).
    """

    metrics: dict = field(default_factory=dict)
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    test_logits: dict[str, Tensor] = field(default_factory=dict)
    temperatures: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def predict_loader(
    model: nn.Module,
    loader: Iterable,
    samples: int,
    seed: int,
    device: str = "cpu",
    desc: str = "",
    shard: Shard | None = None,
) -> tuple[Tensor, Tensor, float, int] | None:
    """MC logits [S, N, C] over a loader, targets [N], compute seconds and the images they cover.

    Every batch uses the same per-sample seeds, so MC sample s is one network applied to all the data.
    The time covers the model's compute only (no data loading), and leaves out each process's first batch
    (warm-up: weight packing, noise pools, allocator), unless it is its only one. With `shard`, this rank
    predicts its batches and rank 0 returns everything in loader order (seconds and images summed over the
    ranks); the other ranks return None.
    """
    shard = shard or Shard()
    model.eval().to(device)
    parts, times = [], []
    for i, (x, y) in tqdm(shard.batches(loader), desc=desc, leave=False, dynamic_ncols=True):
        x = x.to(device)
        _sync(device)
        t0 = time.perf_counter()
        p = mc_logits(model, x, samples, seed=seed)
        _sync(device)
        times.append((time.perf_counter() - t0, x.shape[0]))
        parts.append((i, p.cpu(), y))
    timed = times[1:] or times
    gathered = shard.gather((parts, sum(t for t, _ in timed), sum(n for _, n in timed)))
    if gathered is None:
        return None
    batches = sorted((b for rank_parts, _, _ in gathered for b in rank_parts), key=lambda b: b[0])
    if not batches:
        raise ValueError(f"no data to evaluate {desc!r}: the loader is empty")
    secs, n = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
    return torch.cat([b[1] for b in batches], dim=1), torch.cat([b[2] for b in batches]), secs, n


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def tensors_fingerprint(tensors: Iterable[Tensor]) -> str:
    """SHA-256 of a sequence of tensors (shapes, dtypes, values)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, values): identifies the weights a prediction came from."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, Tensor):
            t = v.detach().cpu()
            h.update(str(t.dtype).encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def _module_specs(model: nn.Module) -> list:
    """The non-tensor settings that change a model's predictions: INT8 layer configs, sampling modes, meta."""
    specs: list = [getattr(model, "qbdl_meta", None)]
    for name, m in model.named_modules():
        if hasattr(m, "spec"):
            specs.append((name, m.spec()))
        elif hasattr(m, "mode") or hasattr(m, "estimator"):
            specs.append((name, getattr(m, "mode", None), getattr(m, "estimator", None)))
    return specs


def variant_fingerprint(v: Variant, seed: int, data_key: str) -> str:
    """Everything that determines a variant's predictions: weights, settings, MC samples and seed, the data."""
    h = hashlib.sha256(model_fingerprint(v.model).encode())
    h.update(json.dumps(_module_specs(v.model), sort_keys=True, default=str).encode())
    h.update(f"{type(v.model).__name__}|{v.samples}|{seed}|{data_key}".encode())
    return h.hexdigest()


def _predict_variant(
    v: Variant, loaders: dict[str, Iterable], seed: int, cache_dir: Path | None, data_key: str, shard: Shard
) -> dict[str, tuple] | None:
    """{split: (logits, targets, seconds, timed images)} of one variant over `loaders` ('test', 'val', 'ood/<name>').

    Reused from cache_dir when the same variant (weights, settings, seeds) saw the same data (rank 0 decides,
    every rank follows). On ranks other than 0: predicts this rank's share, returns None.
    """
    key = f"{v.name}-{variant_fingerprint(v, seed, data_key)[:24]}"
    cached = cache_dir / f"{key}.safetensors" if cache_dir else None
    hit = None
    if shard.is_main and cached is not None and cached.exists():
        t = load_file(str(cached))
        if set(loaders) <= {k.rsplit("/", 1)[0] for k in t}:
            hit = {
                s: (t[f"{s}/logits"], t[f"{s}/y"], float(t[f"{s}/seconds"]), int(t[f"{s}/timed"]))
                for s in loaders
            }
    if shard.broadcast(hit is not None):
        return hit
    out = {}
    for split, loader in loaders.items():
        out[split] = predict_loader(
            v.model, loader, v.samples, seed, v.device, desc=f"{split} {v.name}", shard=shard
        )
    if not shard.is_main:
        return None
    if cached is not None:  # written once every split of the variant is complete: a kill never leaves a part
        tensors = {}
        for split, (lg, y, secs, timed) in out.items():
            tensors |= {f"{split}/logits": lg, f"{split}/y": y}
            tensors |= {f"{split}/seconds": torch.tensor(secs), f"{split}/timed": torch.tensor(timed)}
        atomic_write_bytes(cached, save_tensors({k: t.contiguous() for k, t in tensors.items()}))
    return out


def evaluate_variants(
    variants: list[Variant],
    test_loader: Iterable,
    ood_loaders: dict[str, Iterable],
    *,
    seed: int,
    target_accuracy: float,
    n_bins: int,
    score: str,
    cache_dir: str | Path | None = None,
    data_key: str = "",
    temperature_scaled: Iterable[str] = (),
    val_loader: Iterable | None = None,
    ood_groups: dict[str, str] | None = None,
    shard: Shard | None = None,
) -> Evaluation | None:
    """Metrics per variant, per-example predictions, the curve data the plots need, and the test logits.

    With `cache_dir`, each variant's predictions are kept as they complete, so an interrupted evaluation
    resumes without redoing finished variants; `data_key` identifies the test and OOD data in the cache key.
    temperature_scaled: variant names that also get '<name>_ts': one temperature fitted by NLL on the
    validation split (`val_loader`, never test) and applied to each MC sample's logits before averaging.
    ood_groups: {OOD set: 'near' | 'far'} for the OpenOOD-style group means.
    shard: this rank's share under DDP (every rank calls this; rank 0 gathers and returns the evaluation,
    the other ranks None).
    """
    shard = shard or Shard()
    ev = Evaluation()
    cache_dir = Path(cache_dir) if cache_dir else None
    ts = set(temperature_scaled)
    if ts and val_loader is None:
        raise ValueError("temperature-scaled variants need the validation split (val_loader)")
    unknown = ts - {v.name for v in variants}
    if unknown:
        raise ValueError(f"temperature scaling asked for {sorted(unknown)}, which are not evaluated variants")
    for v in variants:
        loaders = {"test": test_loader} | {f"ood/{k}": ld for k, ld in ood_loaders.items()}
        if v.name in ts:
            loaders["val"] = val_loader
        out = _predict_variant(v, loaders, seed, cache_dir, data_key, shard)
        if out is None:
            continue
        ev.test_logits[v.name] = out["test"][0]
        scaled = [(v.name, 1.0)]
        if v.name in ts:
            val_logits, val_y, _, _ = out["val"]
            ev.temperatures[v.name] = metrics.fit_temperature(val_logits, val_y)
            scaled.append((f"{v.name}_ts", ev.temperatures[v.name]))
        for name, temperature in scaled:
            res, pred, curve = _assess(
                v, out, temperature, target_accuracy=target_accuracy, n_bins=n_bins, score=score,
                ood_groups=ood_groups,
            )  # fmt: skip
            ev.metrics[name], ev.predictions[name], ev.curves[name] = res, pred, curve
    return ev if shard.is_main else None


def _assess(
    v: Variant, out: dict, temperature: float, *, target_accuracy: float, n_bins: int, score: str, ood_groups
) -> tuple[dict, dict, dict]:
    """Metrics, per-example predictions and curves of one variant's logits divided by `temperature`."""
    logits, y, secs, timed = out["test"]
    logits = logits / temperature
    ood_logits = {k[4:]: o[0] / temperature for k, o in out.items() if k.startswith("ood/")}
    p = torch.softmax(logits, -1)
    p_ood = {k: torch.softmax(lg, -1) for k, lg in ood_logits.items()}
    res = metrics.summarize(
        p, y, ood=p_ood or None, target_accuracy=target_accuracy, n_bins=n_bins, score=score,
        logits=logits, ood_logits=ood_logits or None, ood_groups=ood_groups,
    )  # fmt: skip
    res.update(computed_metrics(p, y))  # registry entries that carry their own function
    for group, by_score in (res.get("ood_groups") or {}).items():  # the registry's near/far table columns
        res[f"ood_{group}_auroc"] = by_score[score]["auroc"]
    n = y.numel()
    res.update(
        samples=v.samples,
        backbone_passes=v.samples if v.backbone_passes is None else v.backbone_passes,
        size_bytes=v.size_bytes,
        resident_bytes=resident_bytes(v.model),  # tensors the model keeps between calls (weights, pools, caches)
        images_per_s=timed / secs,  # model compute only, after the first batch, on `device`
        forward_images_per_s=timed * v.samples / secs,
        eval_seconds=secs,
        timed_images=timed,
        device=v.device,
        n_test=n,
    )
    if getattr(v.model, "qbdl_meta", None) is not None:  # which kernels ran, on which activation range
        res["int8"] = int8_summary(v.model.qbdl_meta)
    pbar = p.mean(0)
    ent = metrics.predictive_entropy(p)
    pred = {
        "target": y.numpy(),
        "pbar": pbar.numpy().astype(np.float32),
        "logits": logits.mean(0).numpy().astype(np.float32),
        "entropy": ent.numpy(),
        "mi": metrics.mutual_information(p).numpy(),
        "confidence": pbar.max(-1).values.numpy(),
    }
    for name, po in p_ood.items():
        pred[f"ood_{name}_entropy"] = metrics.predictive_entropy(po).numpy()
        pred[f"ood_{name}_mi"] = metrics.mutual_information(po).numpy()
    correct = pbar.argmax(-1) == y
    curve = {
        "reliability": metrics.reliability_bins(p, y, n_bins=n_bins),
        "uncertainty": metrics.uncertainty_calibration_bins(p, y, n_bins=n_bins),
        "referral": metrics.referral_curve(p, y, score=score),
        "entropy_correct": ent[correct],
        "entropy_incorrect": ent[~correct],
        "roc": {name: metrics.ood_roc_curve(p, po, score=score) for name, po in p_ood.items()},
    }
    return res, pred, curve


def save_predictions(predictions: dict[str, dict[str, np.ndarray]], path: str | Path) -> Path:
    """All per-example predictions in one .npz, keys '<variant>/<field>'."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf, **{f"{v}/{k}": a for v, fields in predictions.items() for k, a in fields.items()}
    )
    return atomic_write_bytes(path, buf.getvalue())
