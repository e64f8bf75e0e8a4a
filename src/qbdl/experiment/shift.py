"""Evaluation under data drift: every variant on every (corruption, severity) set, resumable, plus table and plots.

Pure torch (no Lightning, no Hydra): the evaluation callback calls :func:`evaluate_shift` with the
variants it already evaluated on the clean test split, the sets from
:func:`qbdl.data.shift.shift_datasets` and the clean test logits of each variant.

Result schema (what goes to ``results.json["shift"]``), JSON-serialisable (string keys, floats)::

    shift["cells"][VARIANT][CORRUPTION][str(SEVERITY)][METRIC] = float   # METRIC in CELL_METRICS
    shift["summary"][VARIANT][str(SEVERITY)][METRIC] = {mean, min, q1, median, q3, max, n}  # over corruptions
    shift["mce"][VARIANT] = {mCE, mean_error, CE: {corruption: ...}[, relative_mCE, relative_CE]}
    shift["meta"] = {corruptions, severities, variants, baseline, n_bins, seed, n: {c: {s: images}}}

The temperatures of the ``<name>_ts`` variants are the run's (``results["temperatures"]``), stored once.
Results written before this shape (variants beside ``_summary`` / ``_mce`` / ``_meta``) are read through
:func:`qbdl.experiment.shape.shift_parts`; :func:`cell_results` returns the per-cell part alone, the input
of :mod:`qbdl.metrics.shift` and the data-shift figures. ``mce`` is ``{}`` when the baseline variant
(default ``dnn``) is not among the variants. Fractions everywhere (accuracy, error, ECE, UCE in [0, 1]), as in
:func:`qbdl.metrics.summarize`; non-finite values become ``null`` through
:func:`qbdl.io.atomic_write_json`.

Per cell: ``accuracy, error (= 1 - accuracy, for mCE), nll, brier, ece, uce, entropy_mean, mi_mean``
from :func:`qbdl.metrics.summarize` of softmax(logits), and shift detection ``detect_auroc_entropy`` /
``detect_auroc_mi``: AUROC of telling the shifted images (positives) from the clean test images
(negatives) by predictive entropy / mutual information (a deterministic variant has MI = 0
everywhere: 0.5). Every variant uses its own MC ``samples`` and the clean evaluation's MC ``seed``.

Resume: with ``cache_dir``, each cell's logits [S, N, C] and targets [N] are written atomically
(safetensors) as soon as the cell is done, under ``<cache_dir>/<variant>-<corruption>-<severity>-
<fingerprint>.safetensors``; the fingerprint is :func:`qbdl.experiment.evaluate.variant_fingerprint` of the
variant with ``data_key`` + the set (corruption, severity, its corruption seed and item ids). A
killed-and-restarted evaluation recomputes only the cells without a file; a file that cannot be read
or does not match the set (shape, targets) is reported with a warning and recomputed. The files are
full MC logits: S x N x C float32 per cell (ImageNet-C, 16 samples: 3.2 GB per cell and variant).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from qbdl import metrics
from qbdl.experiment.evaluate import Variant, predict_loader, variant_fingerprint
from qbdl.experiment.shape import shift_parts
from qbdl.experiment.shard import Shard
from qbdl.io import atomic_write_bytes
from qbdl.metrics.shift import corruption_errors, severity_summary

log = logging.getLogger(__name__)

#: Metrics of one (variant, corruption, severity) cell, in this order.
CELL_METRICS = (
    "accuracy",
    "error",
    "nll",
    "brier",
    "ece",
    "uce",
    "entropy_mean",
    "mi_mean",
    "detect_auroc_entropy",
    "detect_auroc_mi",
)
_FROM_SUMMARY = ("accuracy", "nll", "brier", "ece", "uce", "entropy_mean", "mi_mean")
def cell_results(shift: Mapping[str, Any]) -> dict[str, Any]:
    """``{variant: {corruption: {severity: {metric: value}}}}``: the cells of ``shift`` (either shape)."""
    return shift_parts(shift)["cells"]


def set_key(ds: Dataset) -> str:
    """What identifies a shifted set beyond (corruption, severity): its type, size, corruption seed, item ids."""
    ids = getattr(ds, "ids", None)
    h = hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest() if ids is not None else None
    parts = [type(ds).__name__, len(ds), getattr(ds, "seed", None), getattr(ds, "root", None), h]
    return json.dumps(parts, default=str)


def _cache_file(cache_dir: Path, v: Variant, seed: int, data_key: str, c: str, s: int, ds: Dataset) -> Path:
    key = f"{data_key}|shift|{c}|{int(s)}|{set_key(ds)}"
    return cache_dir / f"{v.name}-{c}-{int(s)}-{variant_fingerprint(v, seed, key)[:24]}.safetensors"


def _load_cell(path: Path, v: Variant, n: int) -> tuple[Tensor, Tensor] | None:
    """(logits, targets) from a cell's cache file; None when absent, or (with a warning) when unusable."""
    if not path.exists():
        return None
    try:
        t = load_file(str(path))
        logits, y = t["logits"], t["y"]
        problem = None
        if logits.ndim != 3 or logits.shape[0] != v.samples or logits.shape[1] != n or y.shape != (n,):
            problem = (
                f"unexpected shapes {tuple(logits.shape)} / {tuple(y.shape)} (want [{v.samples}, {n}, C])"
            )
        elif not torch.isfinite(logits).all():
            problem = "it holds non-finite logits"
    except Exception as e:  # truncated file, not safetensors, missing keys ...
        problem = f"it cannot be read ({type(e).__name__}: {e})"
    if problem is not None:
        msg = f"data-shift prediction cache {path} is not usable: {problem}; predicting this cell again"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None
    return logits, y


def cell_metrics(logits: Tensor, y: Tensor, clean_probs: Tensor, n_bins: int) -> dict[str, float]:
    """The CELL_METRICS of one shifted set's MC logits [S, N, C] vs targets [N], against the clean probs."""
    p = torch.softmax(logits.float(), dim=-1)
    s = metrics.summarize(p, y, n_bins=n_bins)
    out = {k: float(s[k]) for k in _FROM_SUMMARY}
    out["error"] = 1.0 - out["accuracy"]
    out["detect_auroc_entropy"] = metrics.ood_auroc(clean_probs, p, score="entropy")
    out["detect_auroc_mi"] = metrics.ood_auroc(clean_probs, p, score="mi")
    return {k: out[k] for k in CELL_METRICS}


def _str_keys(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _str_keys(v) for k, v in x.items()}
    return x


def evaluate_shift(
    variants: list[Variant],
    sets: list[tuple[str, int, Dataset]],
    *,
    seed: int,
    batch_size: int,
    n_bins: int,
    clean_logits: dict[str, Tensor],
    cache_dir: Path | None,
    data_key: str,
    baseline: str = "dnn",
    clean: Mapping[str, Mapping[str, Any]] | None = None,
    temperatures: Mapping[str, float] | None = None,
    num_workers: int = 0,
    shard: Shard | None = None,
) -> dict:
    """Every variant on every (corruption, severity) set: the dict of the module docstring.

    ``clean_logits[variant]``: that variant's clean test MC logits [S, N, C] (the detection negatives).
    ``clean = {variant: clean metrics}`` (with ``accuracy``, e.g. the evaluation's results) adds the
    relative mCE. ``temperatures = {variant: T}`` (the clean evaluation's fitted temperatures of its
    ``<name>_ts`` variants) adds a ``<name>_ts`` variant per entry from the same logits divided by T
    (clean ones too, for detection): temperature scaling fitted on clean validation data, under shift.
    The sets are looped over in the outer loop and the variants inside, so a lazily
    rendered set (``shift.cache: false``) is rendered once per variant; the cached cells are not loaded
    through a DataLoader at all.
    """
    if not sets:
        return {}
    shard = shard or Shard()
    if not shard.is_main:
        _predict_share(variants, sets, seed, batch_size, num_workers, shard)
        return {}
    missing = [v.name for v in variants if v.name not in clean_logits]
    if missing:
        raise KeyError(
            f"clean_logits lacks the clean test logits of variant(s) {missing} (shift detection needs them)"
        )
    temps = {k: float(t) for k, t in (temperatures or {}).items()}
    unknown = sorted(set(temps) - {v.name for v in variants})
    bad_t = {k: t for k, t in temps.items() if not (math.isfinite(t) and t > 0)}
    if unknown or bad_t:
        raise ValueError(f"temperatures: not evaluated variants {unknown} / not positive {bad_t}")
    cache = Path(cache_dir) if cache_dir is not None else None
    # (output name, variant name, temperature) of every result: each variant, then its _ts twin
    outputs = [
        (o, v.name, t) for v in variants for o, t in ((v.name, 1.0), (f"{v.name}_ts", temps.get(v.name)))
    ]
    outputs = [o for o in outputs if o[2] is not None]
    clean_probs = {o: torch.softmax(clean_logits[b].float() / t, dim=-1) for o, b, t in outputs}
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {o: {} for o, _, _ in outputs}
    sizes: dict[str, dict[str, int]] = {}
    corruptions = list(dict.fromkeys(c for c, _, _ in sets))
    sevs = sorted({int(s) for _, s, _ in sets})
    for c, s, ds in sets:
        n = len(ds)
        sizes.setdefault(c, {})[str(int(s))] = n
        loader = None
        for v in variants:
            path = _cache_file(cache, v, seed, data_key, c, s, ds) if cache is not None else None
            got = _load_cell(path, v, n) if path is not None and shard.is_main else None
            if not shard.broadcast(got is not None):  # rank 0 decides: every rank predicts, or none does
                if loader is None:
                    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
                pred = predict_loader(
                    v.model, loader, v.samples, seed, v.device, desc=f"shift {c}/{s} {v.name}", shard=shard
                )
                logits, y, _, _ = pred
                if path is not None:
                    atomic_write_bytes(
                        path, save_tensors({"logits": logits.contiguous(), "y": y.contiguous()})
                    )
            else:
                logits, y = got
            for o, _, t in (x for x in outputs if x[1] == v.name):
                m = cell_metrics(logits / t, y, clean_probs[o], n_bins)
                results[o].setdefault(c, {})[str(int(s))] = m
                log.info("shift %s/%s %s: accuracy %.4f, ECE %.4f", c, s, o, m["accuracy"], m["ece"])
    mce: dict = {}
    if baseline in results:
        mce = corruption_errors(results, baseline, error_key="error", accuracy_key="accuracy", clean=clean)
    return {
        "cells": results,
        "summary": _str_keys(severity_summary(results, metrics=CELL_METRICS)),
        "mce": mce,
        "meta": {
            "corruptions": corruptions,
            "severities": sevs,
            "variants": list(results),
            "baseline": baseline if baseline in results else None,
            "n_bins": int(n_bins),
            "seed": int(seed),
            "n": sizes,
        },
    }


def _predict_share(
    variants: list[Variant], sets: list, seed: int, batch_size: int, num_workers: int, shard: Shard
) -> None:
    """A rank other than 0: its share of every cell rank 0 does not have cached, in rank 0's order."""
    for c, s, ds in sets:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        for v in variants:
            if not shard.broadcast(None):
                predict_loader(
                    v.model, loader, v.samples, seed, v.device, desc=f"shift {c}/{s} {v.name}", shard=shard
                )


def evaluate_shift_stage(
    dm: Any,
    variants: list[Variant],
    shift: Mapping[str, Any],
    clean: Any,
    *,
    seed: int,
    n_bins: int,
    out_dir: Path,
    data_key: str,
    shard: Shard | None = None,
) -> dict:
    """Every variant on `dm`'s corrupted test sets (conf/shift) with the clean evaluation's MC seeds.

    clean: the clean test evaluation (qbdl.experiment.evaluate.Evaluation): its metrics, temperatures and
    test logits (the detection negatives); None on ranks other than 0, which only predict their share.
    Returns the shift results (empty on those ranks); the temperatures are the clean evaluation's.
    """
    from qbdl.data.shift import shift_datasets

    shard = shard or Shard()
    if not shard.is_main:
        shard.barrier()  # rank 0 renders (and caches) the corrupted sets first; the others then read them
    sets = shift_datasets(dm, dict(shift), cache_dir=out_dir / "shift_cache")
    if shard.is_main:
        shard.barrier()
    metrics = clean.metrics if clean is not None else {}
    results = evaluate_shift(
        variants,
        sets,
        seed=seed,
        batch_size=dm.eval_batch_size,
        n_bins=n_bins,
        clean_logits=clean.test_logits if clean is not None else {},
        cache_dir=out_dir / "eval_cache" / "shift",
        data_key=data_key,
        baseline="dnn",
        clean=metrics,
        temperatures=clean.temperatures if clean is not None else {},
        shard=shard,
    )
    return results if shard.is_main else {}  # the other ranks predicted their share; rank 0 has the results
