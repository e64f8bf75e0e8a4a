"""Load and run crafted model files, one after another, recording each outcome (run by test_model_file_fuzz.py).

usage: python model_fuzz_worker.py CASES.json LOG.jsonl

CASES.json: [{"file": PATH, "kind": "qbdl" | "stage", "reference": PATH}, ...]. For each case the worker writes
a "start" line before touching the file (so a crash or hang names its case) and one outcome line after:
"same" (outputs equal the valid file's), "different" (outputs differ, no error: a failure), "error" (a
ValueError / FileNotFoundError, the clean refusal, with its message) or "unclear" (any other exception).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
from safetensors.torch import load_file

from qbdl.bayes.predict import mc_logits
from qbdl.models import resnet20
from qbdl.models.files import load_state
from qbdl.quant import load_qbnn

CLEAN = (ValueError, FileNotFoundError)  # ModelFileError is a ValueError


def _outputs(case: dict) -> dict[str, torch.Tensor]:
    if case["kind"] == "qbdl":
        q = load_qbnn(case["file"])
        x = load_file(case["reference"])["x"]
        return {"logits": mc_logits(q, x, 2, seed=3)}
    m = load_state(resnet20(10, 1), case["file"])
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    log = open(sys.argv[2], "a", buffering=1)

    def write(rec: dict) -> None:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        os.fsync(log.fileno())

    for i, case in enumerate(cases):
        write({"case": i, "status": "start"})
        try:
            got = _outputs(case)
        except CLEAN as exc:
            write({"case": i, "status": "error", "type": type(exc).__name__, "message": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - the point is to record what escapes
            where = traceback.extract_tb(exc.__traceback__)[-1]
            write({"case": i, "status": "unclear", "type": type(exc).__name__, "message": str(exc)[:500],
                   "at": f"{where.filename}:{where.lineno}"})  # fmt: skip
            continue
        ref = load_file(case["reference"])
        same = set(got) <= set(ref) and all(
            got[k].shape == ref[k].shape and torch.equal(got[k], ref[k]) for k in got
        )
        write({"case": i, "status": "same" if same else "different"})


if __name__ == "__main__":
    main()
