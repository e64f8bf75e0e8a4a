"""Evaluate model variants side by side with the same MC seeds: metrics, predictions, plots."""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor, nn
from tqdm.auto import tqdm

from qbdl import metrics
from qbdl.bayes import mc_predict
from qbdl.io import atomic_write_bytes
from qbdl.quant.backend import int8_summary


@dataclass
class Variant:
    """A model to evaluate: `samples` MC passes (1 for a deterministic model); size of its saved weights."""

    name: str
    model: nn.Module
    samples: int
    size_bytes: int
    device: str = "cpu"


def state_dict_bytes(model: nn.Module, skip_prefixes: tuple[str, ...] = ("prior_",)) -> int:
    """Size of the inference weights as saved by torch.save (prior buffers are training-only, left out)."""
    state = {
        k: v for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith(skip_prefixes)
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def predict_loader(
    model: nn.Module, loader: Iterable, samples: int, seed: int, device: str = "cpu", desc: str = ""
) -> tuple[Tensor, Tensor, float]:
    """MC probabilities [S, N, C] over a loader, targets [N], and the wall time in seconds.

    Every batch uses the same per-sample seeds, so MC sample s is one network applied to all the data.
    """
    model.eval().to(device)
    probs, targets = [], []
    t0 = time.perf_counter()
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        probs.append(mc_predict(model, x.to(device), samples, seed=seed).cpu())
        targets.append(y)
    seconds = time.perf_counter() - t0
    if not probs:
        raise ValueError(f"no data to evaluate {desc!r}: the loader is empty")
    return torch.cat(probs, dim=1), torch.cat(targets), seconds


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, dtypes, values): identifies the weights a prediction came from."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        if isinstance(v, Tensor):
            t = v.detach().cpu()
            t = t.int_repr() if t.is_quantized else t
            h.update(str(t.dtype).encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def _predict_variant(v: Variant, test_loader, ood_loaders, seed: int, cache_dir: Path | None) -> tuple:
    """Test and OOD predictions of one variant, reused from cache_dir when the same weights were evaluated."""
    key = f"{v.name}-s{v.samples}-seed{seed}-{model_fingerprint(v.model)[:16]}"
    cached = cache_dir / f"{key}.safetensors" if cache_dir else None
    if cached is not None and cached.exists():
        t = load_file(str(cached))
        ood = {k[4:]: t[k] for k in t if k.startswith("ood/")}
        if set(ood) == set(ood_loaders):
            return t["p"], t["y"], float(t["seconds"]), ood
    p, y, secs = predict_loader(v.model, test_loader, v.samples, seed, v.device, desc=f"eval {v.name}")
    p_ood = {}
    for name, loader in ood_loaders.items():
        p_ood[name], _, _ = predict_loader(
            v.model, loader, v.samples, seed, v.device, desc=f"ood {name} {v.name}"
        )
    if cached is not None:
        tensors = {"p": p, "y": y, "seconds": torch.tensor(secs)} | {f"ood/{k}": t for k, t in p_ood.items()}
        atomic_write_bytes(cached, save_tensors({k: t.contiguous() for k, t in tensors.items()}))
    return p, y, secs, p_ood


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
) -> tuple[dict, dict[str, dict[str, np.ndarray]], dict]:
    """Metrics per variant, per-example predictions, and the curve data the plots need.

    With `cache_dir`, each variant's predictions are kept as they complete, so an interrupted evaluation
    resumes without redoing finished variants.
    """
    results: dict = {}
    predictions: dict[str, dict[str, np.ndarray]] = {}
    curves: dict = {}
    cache_dir = Path(cache_dir) if cache_dir else None
    for v in variants:
        p, y, secs, p_ood = _predict_variant(v, test_loader, ood_loaders, seed, cache_dir)
        res = metrics.summarize(
            p, y, ood=p_ood or None, target_accuracy=target_accuracy, n_bins=n_bins, score=score
        )
        n = y.numel()
        res.update(
            samples=v.samples,
            size_bytes=v.size_bytes,
            images_per_s=n / secs,
            forward_images_per_s=n * v.samples / secs,
            eval_seconds=secs,
            n_test=n,
        )
        if getattr(v.model, "qbdl_meta", None) is not None:  # which kernels ran, on which activation range
            res["int8"] = int8_summary(v.model.qbdl_meta)
        results[v.name] = res
        pbar = p.mean(0)
        ent = metrics.predictive_entropy(p)
        pred = {
            "target": y.numpy(),
            "pbar": pbar.numpy().astype(np.float32),
            "entropy": ent.numpy(),
            "mi": metrics.mutual_information(p).numpy(),
            "confidence": pbar.max(-1).values.numpy(),
        }
        for name, po in p_ood.items():
            pred[f"ood_{name}_entropy"] = metrics.predictive_entropy(po).numpy()
            pred[f"ood_{name}_mi"] = metrics.mutual_information(po).numpy()
        predictions[v.name] = pred
        correct = pbar.argmax(-1) == y
        curves[v.name] = {
            "reliability": metrics.reliability_bins(p, y, n_bins=n_bins),
            "uncertainty": metrics.uncertainty_calibration_bins(p, y, n_bins=n_bins),
            "referral": metrics.referral_curve(p, y, score=score),
            "entropy_correct": ent[correct],
            "entropy_incorrect": ent[~correct],
            "roc": {name: metrics.ood_roc_curve(p, po, score=score) for name, po in p_ood.items()},
        }
    return results, predictions, curves


def save_predictions(predictions: dict[str, dict[str, np.ndarray]], path: str | Path) -> Path:
    """All per-example predictions in one .npz, keys '<variant>/<field>'."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf, **{f"{v}/{k}": a for v, fields in predictions.items() for k, a in fields.items()}
    )
    return atomic_write_bytes(path, buf.getvalue())


def save_plots(curves: dict, out_dir: str | Path, target_accuracy: float) -> dict[str, str]:
    """Draw the paper's figures for every variant; returns {plot name: file path}."""
    from qbdl.report import plots

    out_dir = Path(out_dir)
    files: dict[str, str] = {}

    def save(fig, name: str) -> None:
        files[name] = str(plots.save_figure(fig, out_dir / f"{name}.png"))

    for v, c in curves.items():
        save(plots.reliability_diagram(c["reliability"]), f"reliability_{v}")
        save(plots.uncertainty_calibration_diagram(c["uncertainty"]), f"uncertainty_calibration_{v}")
        save(plots.entropy_density(c["entropy_correct"], c["entropy_incorrect"]), f"entropy_density_{v}")
    save(
        plots.referral_curves({v: c["referral"] for v, c in curves.items()}, target=target_accuracy),
        "referral",
    )
    ood_names = sorted({n for c in curves.values() for n in c["roc"]})
    for name in ood_names:
        rocs = {v: c["roc"][name] for v, c in curves.items() if name in c["roc"]}
        save(plots.ood_roc_curves(rocs), f"ood_roc_{name}")
    return files
