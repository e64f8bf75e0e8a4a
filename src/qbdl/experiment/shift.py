"""Evaluation under data drift: every variant on every (corruption, severity) set, resumable, plus table and plots.

Pure torch (no Lightning, no Hydra): the evaluation callback calls :func:`evaluate_shift` with the
variants it already evaluated on the clean test split, the sets from
:func:`qbdl.data.shift.shift_datasets` and the clean test logits of each variant.

Result schema (what goes to ``results.json["shift"]``), JSON-serialisable (string keys, floats)::

    shift[VARIANT][CORRUPTION][str(SEVERITY)][METRIC] = float   # METRIC in CELL_METRICS
    shift["_summary"][VARIANT][str(SEVERITY)][METRIC] = {mean, min, q1, median, q3, max, n}  # over corruptions
    shift["_mce"][VARIANT] = {mCE, mean_error, CE: {corruption: ...}[, relative_mCE, relative_CE]}
    shift["_meta"] = {corruptions, severities, variants, temperatures, baseline, n_bins, seed,
                      n: {c: {s: images}}}

Top-level keys starting with ``_`` are reserved (variant names may not start with ``_``);
:func:`cell_results` returns the per-cell part alone, the input of :mod:`qbdl.metrics.shift` and
:mod:`qbdl.report.shift_plots`. ``_mce`` is ``{}`` when the baseline variant (default ``dnn``) is not
among the variants. Fractions everywhere (accuracy, error, ECE, UCE in [0, 1]), as in
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
RESERVED = ("_summary", "_mce", "_meta")
#: (metric, table title, display scale) of the console table and the box plots.
DISPLAY = (
    ("accuracy", "accuracy %", 100.0),
    ("ece", "ECE %", 100.0),
    ("uce", "UCE %", 100.0),
    ("nll", "NLL", 1.0),
)


def cell_results(shift: Mapping[str, Any]) -> dict[str, Any]:
    """``{variant: {corruption: {severity: {metric: value}}}}``: ``shift`` without its reserved ``_`` keys."""
    return {k: v for k, v in shift.items() if not str(k).startswith("_")}


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
    bad = [v.name for v in variants if v.name.startswith("_")]
    if bad:
        raise ValueError(f"variant names may not start with '_' (reserved keys of the shift results): {bad}")
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
        **results,
        "_summary": _str_keys(severity_summary(results, metrics=CELL_METRICS)),
        "_mce": mce,
        "_meta": {
            "corruptions": corruptions,
            "severities": sevs,
            "variants": list(results),
            "temperatures": temps,
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


def _mean_over_corruptions(per_c: Mapping[str, Any], metric: str, severity: int) -> float:
    vals = [
        float(m[metric])
        for per_s in per_c.values()
        for s, m in per_s.items()
        if int(s) == int(severity) and m.get(metric) is not None
    ]
    vals = [x for x in vals if math.isfinite(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _fmt(x: Any, scale: float) -> str:
    if x is None or not math.isfinite(float(x)):
        return "-"
    x = float(x) * scale
    return f"{x:.2f}" if scale != 1.0 else f"{x:.4f}"


def shift_table(shift: Mapping[str, Any]) -> str:
    """A console table: per variant, accuracy %, ECE %, UCE %, NLL vs severity (mean over corruptions), and mCE."""
    res = cell_results(shift)
    if not res:
        return "data shift: no results"
    meta = shift.get("_meta") or {}
    sevs = [
        int(s)
        for s in meta.get("severities")
        or sorted({int(s) for p in res.values() for d in p.values() for s in d})
    ]
    corrs = meta.get("corruptions") or sorted({c for p in res.values() for c in p})
    mce = shift.get("_mce") or {}
    base = meta.get("baseline")
    header = ["variant", "metric", *(f"sev {s}" for s in sevs), f"mCE (vs {base})" if base else "mCE"]
    rows = []
    for v, per_c in res.items():
        for i, (metric, title, scale) in enumerate(DISPLAY):
            cells = [_fmt(_mean_over_corruptions(per_c, metric, s), scale) for s in sevs]
            extra = _fmt((mce.get(v) or {}).get("mCE"), 1.0) if i == 0 and mce else ""
            rows.append([v if i == 0 else "", title, *cells, extra])
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(x.ljust(w) if k < 2 else x.rjust(w) for k, (x, w) in enumerate(zip(r, widths)))

    title = f"data shift: {len(corrs)} corruption(s), mean over corruptions per severity"
    return "\n".join([title, line(header), "-" * len(line(header)), *map(line, rows)])


def save_shift_plots(
    shift: Mapping[str, Any], out_dir: Path, clean: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, str]:
    """Ovadia-style box plots (accuracy, ECE, UCE vs severity; one box per variant; clean values when given)
    and, when both exist, the qbnn - bnn paired differences of the same metrics, as PNGs; ``{name: path}``.

    ``clean = {variant: clean metrics}`` (the evaluation's results) adds the "clean" position.
    """
    from qbdl.report.plots import save_figure
    from qbdl.report.shift_plots import severity_boxplot, shift_difference_plot

    res = cell_results(shift)
    files: dict[str, str] = {}
    if not res:
        return files
    out_dir = Path(out_dir)
    titles = {m: t.replace(" %", "") for m, t, _ in DISPLAY}
    for metric in ("accuracy", "ece", "uce"):
        cv = None
        if clean is not None:
            cv = {v: float(clean[v][metric]) for v in res if v in clean and clean[v].get(metric) is not None}
        fig = severity_boxplot(
            res, metric, clean=cv, ylabel=titles[metric], title=f"{titles[metric]} under data shift"
        )
        name = f"shift_{metric}"
        files[name] = str(save_figure(fig, out_dir / f"{name}.png"))
        if "qbnn" in res and "bnn" in res:
            fig = shift_difference_plot(res, metric, "qbnn", "bnn", clean=cv)
            name = f"shift_diff_qbnn_bnn_{metric}"
            files[name] = str(save_figure(fig, out_dir / f"{name}.png"))
    return files


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
) -> tuple[dict, dict[str, str]]:
    """Every variant on `dm`'s corrupted test sets (conf/shift) with the clean evaluation's MC seeds; plots.

    clean: the clean test evaluation (qbdl.experiment.evaluate.Evaluation): its metrics, temperatures and
    test logits (the detection negatives); None on ranks other than 0, which only predict their share.
    Returns the shift results and {plot name: file} (empty on those ranks).
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
        temperatures={
            n.removesuffix("_ts"): r["temperature"] for n, r in metrics.items() if "temperature" in r
        },
        shard=shard,
    )
    if not shard.is_main:  # its share predicted; rank 0 has the results
        return {}, {}
    plots = save_shift_plots(results, out_dir / "plots", clean=clean.metrics)
    log.info("data shift (mean over corruptions):\n%s", shift_table(results))
    return results, plots
