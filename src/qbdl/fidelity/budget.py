"""The error budget: metrics of every part combination, Shapley shares, MC noise floor, SQNRs, checks."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qbdl.bayes.predict import mc_logits, sample_seed
from qbdl.fidelity.ablation import ablation_model, check_qbnn, collect_stats, set_parts, sites_of
from qbdl.fidelity.parts import BASE_METRICS, CONFIGS, FORMAT, PART_DOC
from qbdl.fidelity.sites import channel_view, fake_quant, int8_sample
from qbdl.quant.layers import QuantLayer


def _as_x(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def predict_logits(model: nn.Module, batches: list, samples: int, seed: int, first_index: int = 0) -> Tensor:
    """MC logits [S, N, C]; every batch uses the same per-sample seeds (as qbdl.experiment.evaluate does)."""
    return torch.cat([mc_logits(model, _as_x(b).cpu(), samples, seed, first_index) for b in batches], dim=1)


def budget_metrics(
    logits: Tensor, y: Tensor, ood: dict[str, Tensor], n_bins: int, score: str
) -> dict[str, float]:
    """The budget's metrics of MC logits [S, N, C] (test) and {name: logits} (OOD sets)."""
    from qbdl.metrics.summary import summarize

    p = torch.softmax(logits, -1)
    res = summarize(
        p, y, ood={k: torch.softmax(v, -1) for k, v in ood.items()} or None, n_bins=n_bins, score=score
    )
    out = {k: float(res[k]) for k in BASE_METRICS}
    for name, block in res["ood"].items():
        out[f"ood_auroc/{name}"] = float(block["auroc"])
    if len(res["ood"]) > 1:
        out["ood_auroc_mean"] = sum(float(b["auroc"]) for b in res["ood"].values()) / len(res["ood"])
    return out


def _shapley(v: dict[frozenset, float], player: str) -> float:
    others = [p for p in "abc" if p != player]
    n, total = 3, 0.0
    for r in range(len(others) + 1):
        w = math.factorial(r) * math.factorial(n - r - 1) / math.factorial(n)
        for s in itertools.combinations(others, r):
            total += w * (v[frozenset(s) | {player}] - v[frozenset(s)])
    return total


def mc_noise_floor(values: list[float]) -> float:
    """Mean |v_i - v_j| over all pairs of a metric's values under different MC seeds (0 with < 2 values)."""
    pairs = list(itertools.combinations(values, 2))
    return sum(abs(a - b) for a, b in pairs) / len(pairs) if pairs else 0.0


def mc_noise_floor_of(
    predict: Callable[[int, int], Tensor],
    metric: Callable[[Tensor], float],
    samples: int,
    seeds: Iterable[int],
) -> float:
    """The MC noise floor of `metric` at `samples` MC samples: predict(samples, seed) -> probabilities."""
    return mc_noise_floor([float(metric(predict(samples, s))) for s in seeds])


def _sqnr_db(x: Tensor, xq: Tensor) -> float | None:
    sig, err = float(x.double().pow(2).sum()), float((x.double() - xq.double()).pow(2).sum())
    if sig == 0:
        return None
    return math.inf if err == 0 else 10 * math.log10(sig / err)


def _db(sig: float, err: float) -> float | None:
    if sig == 0:
        return None
    return math.inf if err == 0 else 10 * math.log10(sig / err)


@torch.no_grad()
def _weight_report(abl: nn.Module, seed: int) -> dict[str, dict]:
    out = {}
    for m in abl.ablation.layers:
        q = m.q
        nd = m.mu_fold.dim()
        r: dict[str, Any] = {
            "kind": q.kind,
            "bayesian": m.bayesian,
            "mu_sqnr_db": _sqnr_db(m.mu_fold, m.mu_deq),
        }
        if m.bias_fold is not None:
            r["bias_sqnr_db"] = _sqnr_db(m.bias_fold, m.bias_deq)
        if m.bayesian:
            r["sigma_sqnr_db"] = _sqnr_db(m.sigma_fold, m.sigma_deq)
            step = channel_view(q.w_scale.float(), nd)
            r["sample_step_over_mu_step"] = float((q.w_scale / q.mu_scale).median())
            r["sigma_over_sample_step"] = float((m.sigma_deq / step).median())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(seed, 0))
                q.set_mc_index(0)
                try:
                    wq, _ = int8_sample(q)
                finally:
                    q.set_mc_index(None)
            # variance of the INT8 sample's perturbation over the posterior's: 1 + rounding on the sample grid
            r["sample_noise_var_ratio"] = float((wq - m.mu_deq).pow(2).mean() / m.sigma_deq.pow(2).mean())
        out[m.site_name] = r
    return out


def _emulate_trace(t: dict) -> Tensor:
    """The ablation's FP32 arithmetic on one traced INT8 kernel call: its int8 inputs, weights and qparams."""
    x = (t["x"].float() - t["xz"]) * t["xs"]
    w = t["w"].float()
    ws = t["ws"].float()
    w = w * channel_view(ws, w.dim())
    c = t["config"]
    if t["kind"] == "linear":
        y = F.linear(x, w, t["bias"])
    else:
        conv = getattr(F, t["kind"])
        y = conv(x, w, t["bias"], c["stride"], c["padding"], c["dilation"], c["groups"])
    if t["relu"]:
        y = F.relu(y)
    return torch.round(fake_quant(y, t["os"], t["oz"], t["qmax"]) / t["os"]) + t["oz"]


@torch.no_grad()
def _kernel_check(qbnn: nn.Module, x: Tensor, seed: int) -> dict[str, dict]:
    layers = {n: m for n, m in qbnn.named_modules() if isinstance(m, QuantLayer)}
    for m in layers.values():
        m.trace = []
    try:
        mc_logits(qbnn, x, 1, seed=seed)
        out = {}
        for name, m in layers.items():
            n = bad = 0
            worst = 0.0
            for t in m.trace:
                d = (t["y"].float() - _emulate_trace(t)).abs()
                n, bad, worst = n + d.numel(), bad + int((d > 0).sum()), max(worst, float(d.max()))
            if n:
                out[name] = {"mismatch_share": bad / n, "max_lsb": worst}
    finally:
        for m in layers.values():
            m.trace = None
    return out


def held_out(
    test_batches: Iterable, ood_batches: dict[str, Iterable] | None, max_batches: int | None, who: str
) -> tuple[list, dict[str, list], Tensor]:
    """(test batches, {name: OOD batches}, test labels), each set cut to its first `max_batches` batches."""
    cut = (lambda b: list(itertools.islice(b, max_batches))) if max_batches else list
    test = cut(test_batches)
    if not test:
        raise ValueError(f"{who}: no test batches")
    return test, {k: cut(v) for k, v in (ood_batches or {}).items()}, torch.cat([b[1] for b in test]).long()


def error_budget(
    bnn: nn.Module,
    qbnn: nn.Module,
    test_batches: Iterable,
    ood_batches: dict[str, Iterable] | None = None,
    mc_samples: int = 8,
    seed: int = 0,
    *,
    floor_seeds: int = 3,
    n_bins: int = 15,
    score: str = "entropy",
    max_batches: int | None = None,
    mixed: dict[str, list[str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The error budget of `qbnn` (converted QBNN, or a calibrated prepared model) against `bnn`; see the module doc.

    test_batches: (x, y) batches of held-out data; ood_batches: {name: batches of x or (x, _)}. Every model
    and configuration sees MC sample s under seed sample_seed(seed, s) on every batch. floor_seeds: extra BNN
    evaluations (seeds seed+1..seed+floor_seeds) for the MC noise floor. mixed: {name: layers kept FP32}, each
    evaluated with every other part on (default: the first and the last layer, "first_last_fp32"). Runs on CPU.
    """
    t_start = time.perf_counter()
    say = progress or (lambda _: None)
    test, ood, y = held_out(test_batches, ood_batches, max_batches, "error budget")
    qbnn = check_qbnn(qbnn)
    bnn = bnn.cpu().eval()
    abl = ablation_model(bnn, qbnn)
    data = {"test": test, **{f"ood/{k}": v for k, v in ood.items()}}

    def run(model: nn.Module, s: int, sink: dict | None = None) -> dict[str, Tensor]:
        out = {}
        for name, batches in data.items():
            if sink is not None:
                with collect_stats(model, sink.setdefault(name.removeprefix("ood/"), {})):
                    out[name] = predict_logits(model, batches, mc_samples, s)
            else:
                out[name] = predict_logits(model, batches, mc_samples, s)
        return out

    def metrics_of(lg: dict[str, Tensor]) -> dict[str, float]:
        return budget_metrics(
            lg["test"], y, {k[4:]: v for k, v in lg.items() if k.startswith("ood/")}, n_bins, score
        )

    say("qbnn")
    logits = {"qbnn": run(qbnn, seed)}  # first: builds the QBNN's in-place samplers as its evaluation does
    say("bnn")
    logits["bnn"] = run(bnn, seed)
    stats: dict[str, dict] = {}
    for name, parts in CONFIGS.items():
        say(name)
        set_parts(abl, **{p: True for p in parts})
        logits[name] = run(abl, seed, stats if name == "none" else None)
    order = abl.ablation.graph_order
    mixed = {"first_last_fp32": [order[0], order[-1]]} if mixed is None else mixed
    for name, layers in mixed.items():
        say(f"mixed {name}")
        set_parts(abl, True, True, True, fp32=layers)
        logits[f"mixed/{name}"] = run(abl, seed)
    say("a with exact sigma")
    set_parts(abl, weights=True, exact_sigma=True)
    logits["a_exact_sigma"] = run(abl, seed)
    set_parts(abl)
    configs = {k: metrics_of(v) for k, v in logits.items()}
    exact = configs.pop("a_exact_sigma")
    sigma_grid = {"metrics": exact, "vs_a": {m: configs["a"][m] - v for m, v in exact.items()}}
    mixed_out = {}
    for name, layers in mixed.items():  # what keeping those layers FP32 changes, against all parts on
        got = configs.pop(f"mixed/{name}")
        mixed_out[name] = {
            "fp32_layers": list(layers),
            "metrics": got,
            "vs_all_on": {m: v - configs["abc"][m] for m, v in got.items()},
            "gap": {m: v - configs["bnn"][m] for m, v in got.items()},
        }
    metric_names = list(configs["bnn"])
    floor_values = {m: [configs["bnn"][m]] for m in metric_names}
    for j in range(1, floor_seeds + 1):
        say(f"bnn seed +{j}")
        extra = metrics_of(run(bnn, seed + j))
        for m in metric_names:
            floor_values[m].append(extra[m])

    gap = {}
    for m in metric_names:
        v = {frozenset(c for c in name if name != "none"): configs[name][m] for name in CONFIGS}
        base, full = v[frozenset()], v[frozenset("abc")]
        alone = {p: v[frozenset(p)] - base for p in "abc"}
        gap[m] = {
            "bnn": configs["bnn"][m],
            "qbnn": configs["qbnn"][m],
            "gap": configs["qbnn"][m] - configs["bnn"][m],
            "emulated": full - base,
            "kernel_residual": configs["qbnn"][m] - full,
            "mc_floor": mc_noise_floor(floor_values[m]),
            "alone": alone,
            "leave_one_out": {p: full - v[frozenset("abc") - {p}] for p in "abc"},
            "shapley": {p: _shapley(v, p) for p in "abc"},
            "interaction": (full - base) - sum(alone.values()),
        }

    sites = {}
    for s in sites_of(abl):
        lo, hi = s.grid_range()
        r: dict[str, Any] = {"kind": s.site_kind, "scale": s.scale, "zero_point": s.zp, "qmax": s.qmax}
        r.update(range=[lo, hi], sqnr_db={}, clip={}, clip_low={}, clip_high={})
        for dname, st in stats.items():
            if s.site_name not in st:
                continue
            x2, e2, nlo, nhi, n = st[s.site_name]
            r["sqnr_db"][dname] = _db(x2, e2)
            r["clip"][dname], r["clip_low"][dname], r["clip_high"][dname] = (nlo + nhi) / n, nlo / n, nhi / n
        sites[s.site_name] = r

    ref, full = logits["qbnn"]["test"], logits["abc"]["test"]
    lsb = next(m.out_scale for m in reversed(list(qbnn.modules())) if isinstance(m, QuantLayer))
    diff = (ref - full).abs()
    checks = {
        "all_off_vs_bnn": {
            "max_abs_logit": max(float((logits["none"][k] - logits["bnn"][k]).abs().max()) for k in data),
            "equal": all(torch.equal(logits["none"][k], logits["bnn"][k]) for k in data),
        },
        "all_on_vs_qbnn": {
            "max_abs_logit": float(diff.max()),
            "mean_abs_logit": float(diff.mean()),
            "logit_lsb": float(lsb),
            "max_lsb": float(diff.max()) / lsb,
            "share_exact": float((diff < lsb / 2).float().mean()),
            "argmax_agreement": float((ref.argmax(-1) == full.argmax(-1)).float().mean()),
        },
        "kernel_layers": _kernel_check(qbnn, _as_x(test[0]).cpu(), seed),
    }
    meta = getattr(qbnn, "qbdl_meta", {}) or {}
    return {
        "format": FORMAT,
        "mc_samples": mc_samples,
        "seed": seed,
        "floor_seeds": [seed + j for j in range(1, floor_seeds + 1)],
        "parts": dict(PART_DOC),
        "metrics": metric_names,
        "n_test": int(y.numel()),
        "n_ood": {k: int(v.shape[1]) for k, v in logits["bnn"].items() if k.startswith("ood/")},
        "qbnn": {
            k: meta.get(k) for k in ("sampler", "backend", "activation_qmax", "bank_size", "noise_slots")
        },
        "configs": configs,
        "mixed": mixed_out,
        "sigma_grid": sigma_grid,
        "floor_values": floor_values,
        "gap": gap,
        "layers": _weight_report(abl, seed),
        "sites": sites,
        "checks": checks,
        "seconds": time.perf_counter() - t_start,
    }
