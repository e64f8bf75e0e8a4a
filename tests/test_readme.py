"""Every runnable code block of the README and the docs runs as written (or with its stated overrides).

An HTML comment on the line before a fenced block says what happens to it:

- ``<!-- norun: why -->``: not run (downloads, hours of compute, the whole test suite);
- ``<!-- run -->`` / ``<!-- run: OVERRIDES -->``: run, with OVERRIDES appended to each ``python -m qbdl.run``
  line (a tiny version of the same run; the command as printed is the real one);
- ``<!-- example: NAME -->``: run by its own test (``own-trainer``: tests/test_own_trainer.py);
- no comment: a ``python`` block runs; a shell block does not, and in the pages of this documentation's
  guide (all but those in OTHER_PAGES) every shell block must carry one of the comments above.

The blocks of one page run in order in one fresh directory, so a later block can read what an earlier
one wrote (docs/library.md saves a ``.qbdl`` and then loads it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python", "bash", "sh"}
BLOCK = re.compile(
    r"^(?P<indent>[ ]*)(?:<!-- (?P<kind>norun|run|example)(?::[ ]*(?P<arg>.*?))?[ ]*-->\n(?P=indent))?"
    r"```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
    re.S | re.M,
)
EXAMPLES = {"own-trainer": ROOT / "tests" / "test_own_trainer.py"}
# what every `python -m qbdl.run` of a block gets on top of its own overrides: nothing leaves tmp_path
QUIET = ["estimate=false", "trainer.enable_progress_bar=false"]


def blocks(page: Path) -> list[dict]:
    out = []
    for m in BLOCK.finditer(page.read_text()):
        indent = len(m["indent"])
        body = "".join(
            line[indent:] if line.strip() else "\n" for line in m["body"].splitlines(keepends=True)
        )
        out.append({"lang": m["lang"], "kind": m["kind"], "arg": m["arg"], "body": body})
    return out


# pages written alongside the guide whose shell blocks are install/export recipes, not marked for this runner
OTHER_PAGES = {"deploy.md", "memory.md", "model-file.md", "baselines.md"}


def runnable(page: Path) -> list[dict]:
    return [
        b
        for b in blocks(page)
        if (b["lang"] == "python" and b["kind"] is None) or (b["lang"] in RUN_LANGS and b["kind"] == "run")
    ]


def _with_overrides(script: str, overrides: str | None) -> str:
    """Append the block's overrides (and QUIET) to every `python -m qbdl.run` command, before a pipe."""
    extra = shlex.join([*(shlex.split(overrides) if overrides else []), *QUIET])
    out = []
    for line in script.splitlines():
        if "python -m qbdl.run" in line and "--cfg" not in line:
            head, sep, tail = line.partition(" | ")
            head = head.split("  #")[0].rstrip()
            line = f"{head} {extra}" + (sep + tail if sep else "")
        out.append(line)
    return "\n".join(out) + "\n"


def _env(tmp: Path) -> dict:
    wb = tmp / "wandb_home"
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        **{k: str(wb) for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")},
    }


def _run(block: dict, cwd: Path) -> subprocess.CompletedProcess:
    if block["lang"] == "python":
        cmd = [sys.executable, "-c", block["body"]]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", _with_overrides(block["body"], block["arg"])]
    venv_bin = str(Path(sys.executable).parent)
    env = _env(cwd) | {"PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


PAGES_WITH_CODE = [p for p in PAGES if runnable(p)]


@pytest.mark.parametrize(
    "page", PAGES_WITH_CODE, ids=[p.relative_to(ROOT).as_posix() for p in PAGES_WITH_CODE]
)
def test_runnable_blocks_run(page, tmp_path):
    for i, block in enumerate(runnable(page)):
        proc = _run(block, tmp_path)
        assert proc.returncode == 0, (
            f"{page.name} block {i} ({block['lang']}) failed:\n{block['body']}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )


def test_blocks_are_classified_and_the_library_snippets_run():
    """The runner sees the blocks it should: the library snippets are python blocks it runs."""
    unmarked = [
        (p.name, b["body"][:60])
        for p in PAGES
        if p.name not in OTHER_PAGES
        for b in blocks(p)
        if b["lang"] in ("bash", "sh") and not b["kind"]
    ]
    assert not unmarked, f"shell blocks need <!-- run --> or <!-- norun: why -->: {unmarked}"
    marks = [b for p in PAGES for b in blocks(p) if b["kind"]]
    assert all(b["kind"] != "norun" or b["arg"] for b in marks), "a norun block says why"
    for b in marks:
        if b["kind"] == "example":
            test = EXAMPLES[b["arg"]]
            assert f"example: {b['arg']}" in test.read_text(), f"{test.name} runs the {b['arg']} example"
    lib = [b["body"] for b in runnable(ROOT / "docs" / "library.md") if b["lang"] == "python"]
    assert any("quantize_bnn(" in s and "train_batches =" in s for s in lib)  # defined before use
    assert any("load_qbnn(" in s and "mc_predict(" in s for s in lib)  # load a .qbdl and predict
    assert sum(len(runnable(p)) for p in PAGES) >= 4


def _readme_commands() -> tuple[str, str]:
    quick = [b["body"].strip() for b in blocks(ROOT / "README.md") if b["lang"] == "bash"][:2]
    return quick[0], quick[1]


def test_readme_test_command_is_what_ci_runs():
    _, test_cmd = _readme_commands()
    assert test_cmd == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev,sweeps]' && python -m pytest -q"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci
    assert re.search(r"^python -m pip install -q -e '\.\[dev,sweeps\]'$", ci, re.M)
    assert re.search(r"^python -m pytest -q( |$)", ci, re.M)


def test_readme_main_job_runs(tmp_path):
    """The README's set-up command: `pip install -e .` (the core package, which CI's install contains)
    then `python -m qbdl.run`, run here (shortened) in an empty directory."""
    main_cmd, _ = _readme_commands()
    steps = [s.strip() for s in main_cmd.split("&&")]
    assert steps == [
        "python3 -m venv .venv",
        ". .venv/bin/activate",
        "pip install -e .",
        "python -m qbdl.run",
    ]
    tiny = "dnn.max_epochs=1 bnn.max_epochs=1 trainer.limit_train_batches=2 eval.mc_samples=2 "
    tiny += "quant.calib_batches=1 quant.mc_samples=1 logger=none hydra.run.dir=run"
    proc = _run({"lang": "bash", "body": steps[-1], "arg": tiny}, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"dnn", "dnn_ts", "qdnn", "bnn", "bnn_mean", "qbnn", "qbnn_ts"} <= set(res["variants"])
    assert res["variants"]["qbnn"]["n_test"] == 503  # the embedded digits' test split, no download
