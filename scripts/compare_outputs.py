"""Behaviour unchanged, shown: compare the outputs of two qbdl trees (before / after a refactor).

    python scripts/compare_outputs.py produce SRC OUT     # run the commands with SRC (a tree's src/) first on PYTHONPATH
    python scripts/compare_outputs.py compare BEFORE AFTER

`produce` runs, into OUT: the default run (`python -m qbdl.run`, embedded digits) as OUT/run,
`python -m qbdl.fidelity OUT/run`, a 2-seed sweep (`python -m qbdl.run -m seed=0,1`) as OUT/sweep and
`python -m qbdl.report OUT/sweep`, all with logger=none, threads=1 (deterministic kernels' order).
`compare` prints every difference between the two trees' results.json (run and sweep jobs), the run's
report.html tables, fidelity.json, the sweep's summary.json and its Markdown reports, ignoring what changes run to run: timings and throughput,
paths, timestamps, machine and version records. Exit code 1 when anything differs.

Older results.json kept each `<name>_ts` variant's temperature beside its metrics and the shift bookkeeping
among the variants (`_summary`, `_mce`, `_meta`); both sides are read in today's shape before comparing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

COMMON = ["logger=none", "trainer.enable_progress_bar=false", "threads=1"]
#: Keys whose values are timings, paths or records of the machine: never compared.
IGNORED_KEYS = {
    "timings", "estimate", "machine", "versions", "argv", "plots", "quantization_seconds", "images_per_s",
    "forward_images_per_s", "eval_seconds", "seconds", "run_dir", "paths", "out_dir", "save_dir", "dirpath",
    "default_root_dir", "path", "generated", "created",
}  # fmt: skip
#: Lines of Markdown reports that carry throughput or timing (they differ from run to run).
TIMING_LINE = re.compile(r"img/s|images_per_s|seconds|throughput|speed|\d\d:\d\d:\d\d|/tmp/", re.I)


def produce(src: str, out: str) -> None:
    """Run the default run, its fidelity budget, a 2-seed sweep and its report with `src` first on the path."""
    out_dir = Path(out).resolve()
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "WANDB_MODE": "disabled"}
    steps = [
        ["-m", "qbdl.run", *COMMON, f"hydra.run.dir={out_dir / 'run'}"],
        ["-m", "qbdl.fidelity", str(out_dir / "run")],
        ["-m", "qbdl.run", "-m", *COMMON, "seed=0,1", f"hydra.sweep.dir={out_dir / 'sweep'}"],
        ["-m", "qbdl.report", str(out_dir / "sweep")],
    ]
    for step in steps:
        print("+ python", " ".join(step), flush=True)
        subprocess.run([sys.executable, *step], env=env, check=True, cwd=out_dir.parent)


def canonical_results(r: dict) -> dict:
    """results.json in today's shape: temperatures only at the top level, shift as {cells, summary, mce, meta}."""
    r = dict(r)
    variants = {k: dict(v) for k, v in (r.get("variants") or {}).items()}
    temps = dict(r.get("temperatures") or {})
    for name, v in variants.items():
        t = v.pop("temperature", None)
        if t is not None:
            temps.setdefault(name, t)
    r["variants"], r["temperatures"] = variants, temps
    shift = r.get("shift") or {}
    if shift and "cells" not in shift:
        meta = dict(shift.get("_meta") or {})
        meta.pop("temperatures", None)
        cells = {k: v for k, v in shift.items() if not str(k).startswith("_")}
        shift = {
            "cells": cells,
            "summary": shift.get("_summary", {}),
            "mce": shift.get("_mce", {}),
            "meta": meta,
        }
    r["shift"] = shift
    return r


def diff(a: Any, b: Any, where: str = "", roots: tuple[str, str] = ("", "")) -> list[str]:
    """Differences between two JSON values (numbers exactly; paths under either root normalised)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k in IGNORED_KEYS:
                continue
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only {'after' if k in b else 'before'}")
                continue
            out += diff(a[k], b[k], f"{where}/{k}", roots)
        return out
    if isinstance(a, list) and isinstance(b, list):
        timing = lambda x: isinstance(x, dict) and x.get("metric") in IGNORED_KEYS  # noqa: E731 (a claim on speed)
        a, b = [x for x in a if not timing(x)], [x for x in b if not timing(x)]
        if len(a) != len(b):
            return [f"{where}: {len(a)} items vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]", roots)]
    if isinstance(a, str) and isinstance(b, str):
        a, b = a.replace(roots[0], "<ROOT>"), b.replace(roots[1], "<ROOT>")
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if a != b:
        rel = ""
        if isinstance(a, int | float) and isinstance(b, int | float) and a:
            rel = f" (rel {abs(b - a) / abs(a):.2e})"
        return [f"{where}: {a!r} -> {b!r}{rel}"]
    return []


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _text_lines(path: Path, root: Path) -> list[str]:
    """A Markdown file's lines: timing lines left out, the cells of throughput columns (img/s) masked."""
    out: list[str] = []
    masked: set[int] = set()
    for line in path.read_text().replace(str(root), "<ROOT>").splitlines():
        if not line.startswith("|"):
            masked = set()
        elif not masked and "img/s" in line:  # a table's header: mask its timing columns in the rows below
            masked = {i for i, c in enumerate(line.split("|")) if TIMING_LINE.search(c)}
        elif masked:
            line = "|".join("*" if i in masked else c for i, c in enumerate(line.split("|")))
        if not TIMING_LINE.search(line):
            out.append(line)
    return out


def html_tables(path: Path) -> list[list[list[str]]]:
    """The tables of a report.html as rows of cell texts, throughput columns (img/s) left out."""
    out = []
    for table in re.findall(r"<table>(.*?)</table>", path.read_text(), re.S):
        rows = [
            re.findall(r"<t[hd]>(.*?)</t[hd]>", r, re.S) for r in re.findall(r"<tr>(.*?)</tr>", table, re.S)
        ]
        keep = [i for i, h in enumerate(rows[0] if rows else []) if not TIMING_LINE.search(h)]
        out.append([[r[i] for i in keep if i < len(r)] for r in rows])
    return out


def compare(before: str, after: str) -> int:
    """Print the differences between two produced trees; the number of differences."""
    b, a = Path(before).resolve(), Path(after).resolve()
    roots = (str(b), str(a))
    found: list[str] = []
    pairs = [("run/results.json", True), ("run/fidelity.json", False), ("sweep/summary.json", False)]
    pairs += [(f"sweep/{job}/results.json", True) for job in ("0", "1")]
    for rel, is_results in pairs:
        fb, fa = b / rel, a / rel
        if not (fb.exists() and fa.exists()):
            found.append(f"{rel}: missing on the {'before' if not fb.exists() else 'after'} side")
            continue
        x, y = _json(fb), _json(fa)
        if is_results:
            x, y = canonical_results(x), canonical_results(y)
        found += [f"{rel}{d}" for d in diff(x, y, "", roots)]
    if (b / "run/report.html").exists() and (a / "run/report.html").exists():
        found += [f"run/report.html tables{d}" for d in diff(html_tables(b / "run/report.html"),
                                                             html_tables(a / "run/report.html"), "", roots)]  # fmt: skip
    for rel in ("sweep/report.md", "sweep/sweep_summary.md"):
        fb, fa = b / rel, a / rel
        if not (fb.exists() and fa.exists()):
            found.append(f"{rel}: missing on the {'before' if not fb.exists() else 'after'} side")
            continue
        lb, la = _text_lines(fb, b), _text_lines(fa, a)
        if lb != la:
            only_b, only_a = [x for x in lb if x not in la], [x for x in la if x not in lb]
            found += [f"{rel}: - {x}" for x in only_b] + [f"{rel}: + {x}" for x in only_a]
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) between {b} and {a}")
    return len(found)


def main(argv: list[str] | None = None) -> int:
    """CLI: `produce SRC OUT` or `compare BEFORE AFTER`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce", help="run the commands with SRC first on PYTHONPATH, outputs under OUT")
    p.add_argument("src")
    p.add_argument("out")
    c = sub.add_parser("compare", help="print the differences between two produced trees")
    c.add_argument("before")
    c.add_argument("after")
    args = ap.parse_args(argv)
    if args.cmd == "produce":
        produce(args.src, args.out)
        return 0
    return 1 if compare(args.before, args.after) else 0


if __name__ == "__main__":
    sys.exit(main())
