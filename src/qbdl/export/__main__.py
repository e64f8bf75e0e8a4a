"""python -m qbdl.export RUN_DIR_or_QBDL --format onnx: write the run's INT8 models as ONNX (see qbdl.export)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Command line of the export; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m qbdl.export",
        description="Export a qbdl run's qbnn (INT8 Flipout or a bank of INT8 networks, MC samples in the graph) "
        "and qdnn to ONNX.",
    )
    ap.add_argument(
        "source", help="a finished run directory, or a .qbdl file inside one (RUN_DIR/models/X.qbdl)"
    )
    ap.add_argument("--format", default="onnx", choices=["onnx"], help="output format (onnx)")
    ap.add_argument("--out", default=None, help="output folder (run) or file (.qbdl); default RUN_DIR/export")
    ap.add_argument(
        "--samples",
        type=int,
        default=None,
        help="MC samples per image in the graph (default: eval.mc_samples)",
    )
    ap.add_argument(
        "--sampler",
        default="flipout",
        choices=["flipout", "bank"],
        help="how the graph samples weights (run directory): flipout: per-example INT8 Flipout, new noise every "
        "call (two kernels per layer); bank: K constant INT8 networks, each row through one (the det INT8 "
        "network's speed; K copies of the weights; S <= K samples per image)",
    )
    ap.add_argument("--bank-size", type=int, default=4, help="K networks of --sampler bank")
    ap.add_argument(
        "--perturbations",
        type=int,
        default=1,
        help="int8 perturbations kept per layer (sample s uses s mod K; each is a copy of the weights)",
    )
    ap.add_argument(
        "--noise",
        default="seed",
        choices=["seed", "input"],
        help="seed: an int64 `seed` input drives an in-graph hash; input: signs/bias_noise are inputs",
    )
    arith = ap.add_mutually_exclusive_group()
    arith.add_argument(
        "--approximate",
        dest="exact",
        action="store_false",
        default=None,
        help="the QBNN's sampled layers as QLinearConv groups, biases rounded onto their grids (each layer within "
        "an LSB of qbdl's engine, not equal): the default of --sampler bank",
    )
    arith.add_argument(
        "--exact",
        dest="exact",
        action="store_true",
        help="qbdl's arithmetic in the sampled layers (float biases on exact accumulators, oneDNN's "
        "requantization; slower): the default of --sampler flipout",
    )
    ap.add_argument("--only", default=None, choices=["qbnn", "qdnn"], help="export one of the run's models")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .core import export_file, export_run
    from .graph import ExportError

    src = Path(args.source)
    try:
        if src.is_dir():
            which = (args.only,) if args.only else ("qbnn", "qdnn")
            done = export_run(src, args.out, samples=args.samples, perturbations=args.perturbations,
                              noise=args.noise, which=which, exact=args.exact, sampler=args.sampler,
                              bank_size=args.bank_size)  # fmt: skip
        elif src.suffix == ".qbdl":
            e = export_file(
                src,
                args.out,
                samples=args.samples,
                perturbations=args.perturbations,
                noise=args.noise,
                exact=args.exact,
            )
            done = {e.meta["kind"]: e}
        else:
            raise ExportError(f"{src} is neither a run directory nor a .qbdl file")
    except (ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, e in done.items():
        r = e.meta["referral"]
        thr = (
            "none (no validation split)" if r["threshold"] is None else f"{r['threshold']:.4g} ({r['score']})"
        )
        print(f"{name}: {e.path} ({e.path.stat().st_size / 2**20:.2f} MiB, S={e.meta['mc_samples']}, "
              f"referral threshold {thr}, {e.seconds:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
