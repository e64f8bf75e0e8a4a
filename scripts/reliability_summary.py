"""Render the reliability tests' records as the README's reliability section (Markdown).

    pytest tests/test_reliability_*.py tests/test_fuzz.py     # writes the records
    python scripts/reliability_summary.py                     # prints the section
    python scripts/reliability_summary.py --readme README.md  # replaces it between the markers

Records come from $QBDL_RELIABILITY_LOG (default tests/.reliability/records.jsonl), one JSON object a line,
written by tests/reliability_log.py; the latest record of each (test, fault) counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOG = ROOT / "tests" / ".reliability" / "records.jsonl"
BEGIN, END = "<!-- RELIABILITY:BEGIN -->", "<!-- RELIABILITY:END -->"
ORDER = ["interruption", "loading", "bad input", "test-data isolation", "determinism", "fuzzing"]
TITLES = {
    "interruption": "Interrupted runs (kill, resume, atomic writes)",
    "loading": "Loading model files and checkpoints (no code execution)",
    "bad input": "Bad input and configuration",
    "test-data isolation": "Calibration and model selection never touch test data",
    "determinism": "Determinism",
    "fuzzing": "Fuzzing (hypothesis)",
}


def read_records(path: Path) -> list[dict]:
    """Records of the log, the latest per (test, fault), in first-seen order."""
    if not path.exists():
        return []
    latest: dict[tuple[str, str], dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line of a killed test process
        latest[(rec.get("test", ""), rec.get("fault", ""))] = rec
    return list(latest.values())


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(records: list[dict]) -> str:
    """The Markdown section (without the markers)."""
    if not records:
        return "## Reliability\n\nNo records yet: run the reliability tests, then this script.\n"
    times = sorted(r.get("time", "") for r in records)
    n_trials = sum(int(r.get("count", 0)) for r in records)
    lines = [
        "## Reliability",
        "",
        "Produced by the tests (`tests/test_reliability_*.py`, `tests/test_fuzz.py`) through "
        "`tests/reliability_log.py`, rendered by `python scripts/reliability_summary.py`. "
        f"{len(records)} checks, {n_trials} trials in all (inputs, injected faults, outcome); "
        f"records from {times[0]} to {times[-1]}.",
        "",
    ]
    cats = sorted({r["category"] for r in records}, key=lambda c: (ORDER.index(c) if c in ORDER else 99, c))
    for cat in cats:
        lines += [
            f"### {TITLES.get(cat, cat)}",
            "",
            "| Test | Inputs | Fault | Count | Outcome |",
            "|---|---|---|---:|---|",
        ]
        for r in (r for r in records if r["category"] == cat):
            lines.append(
                f"| `{_cell(r['test'])}` | {_cell(r['inputs'])} | {_cell(r['fault'])} | {r['count']} | "
                f"{_cell(r['outcome'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between the markers (appending the markers when absent)."""
    text = readme.read_text() if readme.exists() else ""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", type=Path, default=Path(os.environ.get("QBDL_RELIABILITY_LOG") or DEFAULT_LOG))
    ap.add_argument("--readme", type=Path, help="update this README between the RELIABILITY markers")
    args = ap.parse_args(argv)
    section = render(read_records(args.log))
    if args.readme:
        update_readme(args.readme, section)
        print(f"updated {args.readme} ({len(section.splitlines())} lines)", file=sys.stderr)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
