"""python -m qbdl.fidelity RUN_DIR: the error budget of a finished run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qbdl.fidelity.budget import error_budget
from qbdl.fidelity.render import format_budget, json_safe, plot_budget


def load_run(run_dir: str | Path) -> tuple[nn.Module, nn.Module, Any, dict, dict]:
    """(bnn, qbnn, datamodule, ood loaders, config) of a finished run: qbdl.pipeline.build.load_run as a tuple."""
    from qbdl.pipeline.build import load_run as load

    return load(run_dir).astuple()


def main(argv: list[str] | None = None) -> int:
    """CLI: error budget of a finished run; writes RUN_DIR/fidelity.json and fidelity.png, prints a table."""
    ap = argparse.ArgumentParser(prog="python -m qbdl.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "run_dir", help="output directory of python -m qbdl.run (results.json, bnn.safetensors, models/)"
    )
    ap.add_argument("--mc-samples", type=int, default=None, help="default: the run's eval.mc_samples")
    ap.add_argument("--seed", type=int, default=None, help="default: the run's eval.seed")
    ap.add_argument("--floor-seeds", type=int, default=3, help="extra BNN seeds for the MC noise floor")
    ap.add_argument("--max-batches", type=int, default=None, help="first B batches of each set only")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="output directory (default: RUN_DIR)")
    ap.add_argument(
        "--shift",
        default=None,
        metavar="CORRUPTION:SEVERITY",
        help="the budget on this corrupted copy of the test split (a conf/shift corruption, severity 1-5) "
        "instead of the clean one; writes fidelity_<corruption>_<severity>.json/.png",
    )
    ap.add_argument(
        "--draws",
        type=int,
        default=None,
        metavar="R",
        help="instead of the budget: R MC draws of each model on disjoint MC indices, each metric's mean gap with "
        "a 95%% interval against the MC floor (within / beyond / undecided); writes <stem>_draws.json",
    )
    ap.add_argument(
        "--parts",
        default="",
        help="with --draws: draw the ablation model with these budget parts on (a weights, b sampling, "
        "c activations, e.g. b or ac) instead of the QBNN; writes <stem>_draws_<parts>.json",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        bnn, qbnn, dm, ood, cfg = load_run(args.run_dir)
        test, stem = dm.test_dataloader(), "fidelity"
        if args.shift:
            test, shift = _shifted_test(dm, args.shift, int(cfg.get("seed") or 0))
            stem = f"fidelity_{shift['corruption']}_{shift['severity']}"
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ev = cfg.get("eval", {})
    mc = args.mc_samples or int(ev.get("mc_samples", 8))
    seed = args.seed if args.seed is not None else int(ev.get("seed", 0))
    say = lambda s: print(f"  evaluating {s}", file=sys.stderr, flush=True)  # noqa: E731
    out = Path(args.out or args.run_dir)
    if args.draws is not None:
        from qbdl.fidelity.draws import compare_draws, format_draws

        try:
            res = compare_draws(
                bnn, qbnn, test, ood, mc_samples=mc, draws=args.draws, seed=seed, n_bins=int(ev.get("n_bins", 15)),
                score=str(ev.get("score", "entropy")), max_batches=args.max_batches, parts=args.parts, progress=say,
            )  # fmt: skip
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _write(
            res,
            out,
            f"{stem}_draws" + (f"_{args.parts}" if args.parts else ""),
            args.run_dir,
            shift if args.shift else None,
            format_draws(res),
        )
    budget = error_budget(
        bnn,
        qbnn,
        test,
        ood,
        mc_samples=mc,
        seed=seed,
        floor_seeds=args.floor_seeds,
        n_bins=int(ev.get("n_bins", 15)),
        score=str(ev.get("score", "entropy")),
        max_batches=args.max_batches,
        progress=say,
    )
    out.mkdir(parents=True, exist_ok=True)
    plot_budget(budget, out / f"{stem}.png")
    return _write(budget, out, stem, args.run_dir, shift if args.shift else None, format_budget(budget))


def _write(res: dict, out: Path, stem: str, run_dir: str, shift: dict | None, table: str) -> int:
    """Stamp `res` with the machine and run, write OUT/STEM.json atomically, print the table."""
    from qbdl.io import atomic_write_json
    from qbdl.machine import machine_info

    res["machine"] = machine_info()
    res["run_dir"] = str(Path(run_dir).resolve())
    if shift:
        res["shift"] = shift
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", json_safe(res))
    print(table)
    print(f"wrote {out / (stem + '.json')} ({res['seconds']:.0f} s)")
    return 0


def _shifted_test(dm: Any, spec: str, seed: int) -> tuple[Any, dict]:
    """A loader of the corrupted test split named by 'CORRUPTION:SEVERITY', and its description."""
    from torch.utils.data import DataLoader

    from qbdl.data.shift import shift_datasets

    corruption, _, severity = spec.partition(":")
    if not severity.strip().isdigit():
        raise ValueError(f"--shift {spec!r}: give CORRUPTION:SEVERITY, e.g. gaussian_noise:3")
    cfg = {"corruptions": [corruption], "severities": [int(severity)], "seed": seed, "cache": False}
    ((c, s, ds),) = shift_datasets(dm, cfg)
    loader = DataLoader(ds, batch_size=dm.eval_batch_size, shuffle=False)
    return loader, {"corruption": c, "severity": s, "seed": seed}
