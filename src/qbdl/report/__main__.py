"""python -m qbdl.report RUN_DIR... [--out DIR] [--wandb ENTITY/PROJECT]: the multi-run report.

RUN_DIR is a run directory (with results.json) or a Hydra multirun directory (every subdir with results.json).
Writes DIR/report.html, DIR/report.md and DIR/summary.json: a comparison table per run, mean ± std over the
seeds of runs that differ only by seed, and the paper's claims as paired differences with 95% t intervals,
t tests (a better than b) and equivalence tests (TOST: QBNN within the declared margins of the BNN); --holm
adjusts the p values for the number of claims.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qbdl.report import multi


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m qbdl.report", description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs or Hydra multirun dirs")
    ap.add_argument("--out", default=None, help="output dir (default: the first RUN_DIR)")
    ap.add_argument(
        "--wandb",
        default=None,
        metavar="ENTITY/PROJECT",
        help="also build a W&B Report (saved when online; offline it is written as OUT/wandb_report.json)",
    )
    ap.add_argument("--holm", action="store_true", help="Holm-adjust the p values over each group's claims")
    args = ap.parse_args(argv)
    try:
        runs = multi.load_runs(args.run_dirs)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or args.run_dirs[0])
    files = multi.write_report(runs, out, args.holm)
    print(multi.render_markdown(runs, args.holm))
    for kind, path in files.items():
        print(f"{kind}: {path}")
    if args.wandb:
        from qbdl.report import wandb_report

        if "/" not in args.wandb:
            print("error: --wandb takes ENTITY/PROJECT", file=sys.stderr)
            return 2
        entity, project = args.wandb.split("/", 1)
        where = wandb_report.publish(runs, entity, project, out)
        print(f"wandb report: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
