"""Throughput check of the INT8 variants (deterministic INT8 DNN, QBNN bank, QBNN fresh) on ResNet-50.

python -m qbdl.quant.benchcheck [--batches 1 8 32] [--size 224] [--budget 240] [--backend x86]
prints a JSON line and a table of images/s and ratios vs deterministic INT8 (medians of interleaved runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..bayes import dnn_to_bnn, set_mc_index
from .ptq import calibrate, convert, prepare


def build_int8_variants(
    dnn: nn.Module,
    calib: list[torch.Tensor],
    backend: str = "x86",
    bank_size: int = 16,
    seed: int = 0,
    mc_samples: int = 1,
    moped_delta: float = 0.05,
) -> dict[str, nn.Module]:
    """{'int8': deterministic INT8 of `dnn`, 'qbnn_bank', 'qbnn_fresh'}: the same pipeline on dnn and its BNN."""
    dnn = dnn.eval()
    prep = calibrate(prepare(dnn, backend=backend), calib, mc_samples=1, seed=seed)
    out = {"int8": convert(prep, backend=backend)}
    bnn = dnn_to_bnn(dnn, moped_delta=moped_delta).eval()
    prep = calibrate(prepare(bnn, backend=backend), calib, mc_samples=mc_samples, seed=seed)
    out["qbnn_bank"] = convert(prep, mode="bank", bank_size=bank_size, seed=seed, backend=backend)
    out["qbnn_fresh"] = convert(prep, mode="fresh", seed=seed, backend=backend)
    return out


@torch.no_grad()
def interleaved_throughput(
    models: dict[str, Callable], x: torch.Tensor, reps: int, budget_s: float, warmup: int = 2
) -> dict[str, float]:
    """Median images/s per model over interleaved repetitions (stops early when budget_s is spent)."""
    for f in models.values():
        for _ in range(warmup):
            f(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    t_end = time.perf_counter() + budget_s
    for r in range(reps):
        for k, f in models.items():
            t0 = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t0)
        if r >= 2 and time.perf_counter() > t_end:
            break
    return {k: x.shape[0] / statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    """Run the check and print JSON + a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="x86")
    ap.add_argument("--bank-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument(
        "--budget", type=float, default=240.0, help="seconds of timing in total (split over batches)"
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ..models import resnet50

    dnn = resnet50(num_classes=1000).eval()
    calib = [torch.randn(2, 3, args.size, args.size)]
    t0 = time.perf_counter()
    variants = build_int8_variants(dnn, calib, args.backend, args.bank_size)
    build_s = time.perf_counter() - t0
    # 1 MC sample = sample index 0, as mc_predict runs it (bank entry 0); 'bank_rotating' draws a random
    # entry per forward (what S > 1 samples cycle through; colder caches).
    set_mc_index(variants["qbnn_bank"], 0)
    rot = copy.deepcopy(variants["qbnn_bank"])
    set_mc_index(rot, None)
    variants["qbnn_bank_rotating"] = rot
    results = {}
    for b in args.batches:
        x = torch.randn(b, 3, args.size, args.size)
        ips = interleaved_throughput(variants, x, args.reps, args.budget / len(args.batches))
        results[b] = {k: round(v, 2) for k, v in ips.items()}
        results[b].update({f"{k}_ratio": round(v / ips["int8"], 3) for k, v in ips.items() if k != "int8"})
    report = {
        "model": "resnet50",
        "size": args.size,
        "threads": args.threads,
        "backend": args.backend,
        "bank_size": args.bank_size,
        "build_s": round(build_s, 1),
        "images_per_s": results,
    }
    print(json.dumps(report))
    print("images/s (ratio vs deterministic INT8)")
    print(f"{'batch':>5} {'int8':>8} {'bank':>16} {'bank rotating':>16} {'fresh':>16}")
    for b, r in results.items():
        cells = [
            f"{r[k]:.1f} ({r[k + '_ratio']:.2f}x)" for k in ("qbnn_bank", "qbnn_bank_rotating", "qbnn_fresh")
        ]
        print(f"{b:>5} {r['int8']:>8.1f} " + " ".join(f"{c:>16}" for c in cells))
    return report


if __name__ == "__main__":
    main()
