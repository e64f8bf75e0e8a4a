"""QBNN against BNN over independent MC draws: is the gap within the MC floor, shown with an interval?

One evaluation of either model is one draw of an MC estimate: S weight samples, the same for every batch (MC
indices i..i+S-1). One QBNN draw against one BNN draw (what the error budget compares) differs by MC noise
alone by more than the budget's floor, the mean |difference| of two BNN draws, 42% of the time when the two
laws are the same (|N(0, 2 sd^2)| exceeds its mean 2 sd / sqrt(pi) with probability P(|Z| > 0.80)), so a
single pair can neither show a gap within the floor nor one beyond it. Here both models are drawn R times on
disjoint MC indices (draw r: indices r*S .. r*S+S-1; the QBNN's noise keys and the BNN's RNG seeds both follow
the index), and each metric's mean difference QBNN - BNN gets a Welch interval (95% by default). Verdicts:

  within     the whole interval lies inside (-floor, +floor): equivalence within the floor (TOST, 2.5% a side)
  beyond     the interval lies wholly outside [-floor, +floor]: a gap larger than the floor
  undecided  otherwise (more draws narrow the interval)

floor = mean |b_i - b_j| over the pairs of the BNN's R draws: the budget's mc_floor, from R draws.

`parts` ("a", "b", "c" or a combination; error_budget's parts) draws the ablation model with those parts on in
place of the QBNN: which part carries a gap. Without (b) it runs on the BNN's own random numbers, so draw r of
both models is paired, and the interval is the paired t interval of the R differences (far narrower).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from scipy import stats
from torch import nn

from qbdl.fidelity.ablation import ablation_model, check_qbnn, set_parts
from qbdl.fidelity.budget import budget_metrics, held_out, mc_noise_floor, predict_logits
from qbdl.fidelity.parts import PARTS, SHORT

FORMAT = "qbdl-fidelity-draws-1"


def _t_interval(diff: float, se: float, df: float, level: float) -> dict[str, float]:
    """diff with its t interval at `level` and the two-sided p of diff = 0 (an exact diff when se is 0)."""
    if se == 0:
        return {"diff": diff, "se": 0.0, "df": df, "lo": diff, "hi": diff, "p": float(diff == 0)}
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    p = 2 * float(stats.t.sf(abs(diff) / se, df))
    return {"diff": diff, "se": se, "df": df, "lo": diff - half, "hi": diff + half, "p": p}


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """mean(a) - mean(b) with its Welch standard error, degrees of freedom, `level` interval and p (equal means)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"a Welch interval needs >= 2 draws of each model, got {na} and {nb}")
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    if se2 == 0:  # both sets constant: the difference is exact
        return _t_interval(ma - mb, 0.0, float(na + nb - 2), level)
    df = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return _t_interval(ma - mb, math.sqrt(se2), df, level)


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """mean(a - b) of paired draws with its standard error, degrees of freedom, `level` interval and p (mean 0)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    if n < 2:
        raise ValueError(f"a paired interval needs >= 2 draws, got {n}")
    m = sum(d) / n
    return _t_interval(m, math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n), float(n - 1), level)


def verdict(lo: float, hi: float, floor: float) -> str:
    """'within' if [lo, hi] lies inside (-floor, floor), 'beyond' if wholly outside [-floor, floor], else 'undecided'."""
    if -floor < lo and hi < floor:
        return "within"
    if lo > floor or hi < -floor:
        return "beyond"
    return "undecided"


@torch.no_grad()
def compare_draws(
    bnn: nn.Module,
    qbnn: nn.Module,
    test_batches: Iterable,
    ood_batches: dict[str, Iterable] | None = None,
    mc_samples: int = 8,
    draws: int = 10,
    seed: int = 0,
    *,
    level: float = 0.95,
    n_bins: int = 15,
    score: str = "entropy",
    max_batches: int | None = None,
    parts: str = "",
    progress: Any = None,
) -> dict[str, Any]:
    """`draws` MC estimates of each model on disjoint MC indices, and per metric the gap's interval and verdict.

    parts: compare the ablation model with these error-budget parts on ("b", "ac", ...) instead of the QBNN.
    """
    if draws < 2:
        raise ValueError(f"--draws must be >= 2 (an interval needs two draws of each model), got {draws}")
    t_start = time.perf_counter()
    say = progress or (lambda _: None)
    test, ood, y = held_out(test_batches, ood_batches, max_batches, "draws")
    unknown = set(parts) - set(SHORT.values())
    if unknown:
        raise ValueError(f"parts {parts!r}: use a, b, c or a combination (weights, sampling, activations)")
    tested = check_qbnn(qbnn)
    if parts:
        tested = set_parts(ablation_model(bnn, tested), **{p: SHORT[p] in parts for p in PARTS})
    paired = bool(parts) and "b" not in parts  # the BNN's own random numbers in both: draw r against draw r
    models = {"qbnn": tested, "bnn": bnn.cpu().eval()}
    values: dict[str, dict[str, list[float]]] = {"qbnn": {}, "bnn": {}}
    for r in range(draws):
        for name, model in models.items():
            say(f"{name} draw {r + 1}/{draws}")
            first = r * mc_samples
            lg = predict_logits(model, test, mc_samples, seed, first)
            lo = {k: predict_logits(model, v, mc_samples, seed, first) for k, v in ood.items()}
            for m, v in budget_metrics(lg, y, lo, n_bins, score).items():
                values[name].setdefault(m, []).append(v)
    metrics = {}
    for m, b in values["bnn"].items():
        q = values["qbnn"][m]
        w = (paired_interval if paired else welch_interval)(q, b, level)
        floor = mc_noise_floor(b)
        metrics[m] = {
            "qbnn": q, "bnn": b, "qbnn_mean": sum(q) / len(q), "bnn_mean": sum(b) / len(b),
            **w, "floor": floor, "verdict": verdict(w["lo"], w["hi"], floor),
        }  # fmt: skip
    meta = getattr(qbnn, "qbdl_meta", {}) or {}
    return {
        "format": FORMAT,
        "mc_samples": mc_samples,
        "draws": draws,
        "seed": seed,
        "level": level,
        "parts": parts or "abc (the INT8 QBNN)",
        "paired": paired,
        "n_test": int(y.numel()),
        "qbnn": {k: meta.get(k) for k in ("sampler", "backend", "activation_qmax", "bank_size")},
        "metrics": metrics,
        "seconds": time.perf_counter() - t_start,
    }


def format_draws(res: dict[str, Any]) -> str:
    """A markdown table of compare_draws' result: means, gap, interval, floor and verdict per metric."""
    pct = int(round(100 * res["level"]))
    what = "QBNN" if res["parts"].startswith("abc") else f"parts {res['parts']}"
    kind = "paired t" if res["paired"] else "Welch"
    lines = [
        f"{what} vs BNN over {res['draws']} MC draws of {res['mc_samples']} samples each (disjoint MC indices), "
        f"{res['n_test']} test images; {kind} {pct}% interval of the mean gap against the MC floor:",
        "",
        f"| metric | QBNN mean | BNN mean | gap | {pct}% interval | floor | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, r in res["metrics"].items():
        lines.append(
            f"| {m} | {r['qbnn_mean']:.4f} | {r['bnn_mean']:.4f} | {r['diff']:+.4f} | "
            f"[{r['lo']:+.4f}, {r['hi']:+.4f}] | {r['floor']:.4f} | {r['verdict']} |"
        )
    return "\n".join(lines)
