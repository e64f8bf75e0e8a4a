"""A model file is untrusted input: crafted `.qbdl` files and stage files never run code, crash, hang or predict
silently wrong.

Every crafted file is loaded and used (mc_logits) in a worker subprocess (model_fuzz_worker.py), which logs a
"start" line before each case, so a signal or a hang names its case. Outcomes allowed: a clean refusal
(ValueError / FileNotFoundError) or outputs identical to the valid file's; never a signal, a hang, a file
written by a payload, an unclear exception, or (for files whose digests are intact) different outputs.

1. `test_each_attack_of_issue_28_is_refused`: one hand-made case per class of the attack table (code in graph
   strings, SIGFPE parameters, silent-wrong fields and tensors, memory bombs, unclear errors).
2. `test_fuzz_qbdl_files`: hypothesis mutations (set a field to a nasty value, delete, duplicate, retype;
   change a tensor's dtype, shape or values, swap, drop or add tensors) of four valid files (fresh, bank,
   flipout QBNN and an INT8 DNN), in three modes: as saved (digests intact: strict), digests recomputed (an
   attacker who knows the format) and downgraded to format 3 (no digests). In the last two a crafted but
   valid file may predict differently: that is a different model, counted, not an error.
3. `test_fuzz_stage_files`: the same for the .safetensors stages qbdl.run resumes from (header and tensors).
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qbdl.bayes import dnn_to_bnn
from qbdl.bayes.predict import mc_logits
from qbdl.models import resnet20
from qbdl.models.files import save_state
from qbdl.quant import quantize_bnn, save_qbnn
from qbdl.quant.schema import file_digests

HERE = Path(__file__).parent
WORKER = HERE / "model_fuzz_worker.py"
N_FUZZ = int(os.environ.get("QBDL_FUZZ_CASES", "60"))  # per mode; the slow test runs 10x


class Tiny(nn.Module):
    """conv-BN-ReLU, max pool, a residual add, adaptive average pool, linear: every module type of the format."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool, self.avg, self.fc = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(x)
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(torch.flatten(self.avg(x), 1))


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    """Valid files (fresh / bank / flipout QBNN, INT8 DNN, a resnet20 stage) and their reference outputs."""
    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    net = Tiny().eval()
    bnn = dnn_to_bnn(net, moped_delta=0.1).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    out = {}
    for name, model, kw in [
        ("fresh", bnn, {"sampler": "fresh"}),
        ("bank", bnn, {"sampler": "bank", "bank_size": 2}),
        ("flipout", bnn, {"sampler": "flipout", "bank_size": 2}),
        ("qdnn", net, {}),
    ]:
        q = quantize_bnn(model, calib, backend="x86", mc_samples=2, seed=5, **kw)
        save_qbnn(q, str(d / f"{name}.qbdl"))
        save_file({"x": x, "logits": mc_logits(q, x, 2, seed=3)}, d / f"{name}.ref.safetensors")
        out[name] = d / f"{name}.qbdl"
    stage = resnet20(10, 1)
    save_state(stage, d / "bnn.safetensors")
    save_file({k: v.contiguous() for k, v in stage.state_dict().items()}, d / "stage.ref.safetensors")
    out["stage"] = d / "bnn.safetensors"
    return out


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["qbdl"]), {k: f.get_tensor(k) for k in f.keys()}


def _write(path: Path, meta: dict, tensors: dict, mode: str = "attacker") -> Path:
    """Save a crafted file: digests recomputed ('attacker'), kept as they were ('as-is') or dropped (format 3)."""
    meta = copy.deepcopy(meta)
    if mode == "attacker":
        try:
            meta["digests"] = file_digests(meta, tensors)
        except Exception:  # noqa: BLE001 - a document json cannot serialise is simply left with stale digests
            pass
    elif mode == "legacy":
        meta["format"] = "qbdl-qbnn/3"
        meta.pop("digests", None)
    save_file(tensors, path, metadata={"qbdl": json.dumps(meta)})
    return path


def run_worker(cases: list[dict], tmp: Path, timeout: float) -> list[dict]:
    """Run the cases in one worker process; returns one outcome per case (signals and hangs included)."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    log = tmp / "log.jsonl"
    log.write_text("")
    results: dict[int, dict] = {}
    start = 0
    while start < len(cases):  # after a crash or hang, record it and go on with the next case
        (tmp / "cases.json").write_text(json.dumps(cases[start:]))
        log.write_text("")
        try:
            proc = subprocess.run(
                [sys.executable, str(WORKER), str(tmp / "cases.json"), str(log)],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        lines = [json.loads(s) for s in log.read_text().splitlines() if s.strip()]
        last = start - 1
        for rec in lines:
            i = start + rec["case"]
            if rec["status"] != "start":
                results[i] = rec
            last = i
        if rc == 0 and len(results) >= len(cases):
            break
        if rc != 0:
            results[last] = {"status": "signal" if rc != "timeout" else "hang", "rc": rc}
            if rc != "timeout" and isinstance(rc, int) and rc > 0:
                results[last]["stderr"] = proc.stderr[-2000:]
        start = last + 1
    return [results.get(i, {"status": "missing"}) for i in range(len(cases))]


# -- 1. the attack table of issue 28, one case per row


def _node(meta, op):
    return next(n for n in meta["nodes"] if n["op"] == op)


def _layer(meta, name="conv1"):
    return meta["modules"][name]["config"]


def _first(meta, kind):
    return next(s["config"] for s in meta["modules"].values() if s["type"] == kind)


def _payload(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


ATTACKS = {
    # arbitrary code (fx codegen of file strings)
    "placeholder default": (
        "bank",
        lambda m, t, k: _node(m, "placeholder").update(target=f"x={_payload(k)}"),
    ),
    "call_method quote": (
        "bank",
        lambda m, t, k: m["nodes"].insert(
            -1,
            {
                "name": "evil",
                "op": "call_method",
                "target": f'size"); {_payload(k)}; ("',
                "args": {"tuple": [{"node": "x"}]},
                "kwargs": {"dict": {}},
            },
        ),
    ),  # fmt: skip
    "kwargs key": (
        "bank",
        lambda m, t, k: next(n for n in m["nodes"] if n["op"] == "call_function")["kwargs"].update(
            {"dict": {f"start_dim={_payload(k)}, end_dim": 1}}
        ),
    ),  # fmt: skip
    "get_attr node": (
        "bank",
        lambda m, t, k: m["nodes"].insert(
            1,
            {
                "name": "w",
                "op": "get_attr",
                "target": "conv1.mu_q",
                "args": {"tuple": []},
                "kwargs": {"dict": {}},
            },
        ),
    ),  # fmt: skip
    "node name": ("bank", lambda m, t, k: _node(m, "placeholder").update(name=f"x; {_payload(k)}")),
    "class name": ("bank", lambda m, t, k: m.update(class_name=f"Q({_payload(k)})")),
    "string argument": (
        "bank",
        lambda m, t, k: next(n for n in m["nodes"] if n["op"] == "call_function")["args"]["tuple"].append(
            _payload(k)
        ),
    ),  # fmt: skip
    "nn module by name": (
        "bank",
        lambda m, t, k: m["modules"].update(
            {"pool2": {"type": "nn.Upsample", "config": {"scale_factor": 1e6}}}
        ),
    ),  # fmt: skip
    # SIGFPE in native code
    "stride 0": ("bank", lambda m, t, k: _layer(m).update(stride=[0, 1])),
    "output_size 0": ("bank", lambda m, t, k: _first(m, "QAdaptiveAvgPool").update(output_size=0)),
    "groups 0": ("bank", lambda m, t, k: _layer(m).update(groups=0)),
    "dilation 0": ("bank", lambda m, t, k: _layer(m).update(dilation=[0, 0])),
    # silent wrong output
    "scale 0": ("bank", lambda m, t, k: _first(m, "Quantize").update(scale=0.0)),
    "scale negative": ("bank", lambda m, t, k: _layer(m).update(out_scale=-0.1)),
    "scale NaN": ("bank", lambda m, t, k: _layer(m).update(in_scale=math.nan)),
    "scale inf": ("bank", lambda m, t, k: _first(m, "QAdd").update(scale=math.inf)),
    "scale subnormal": ("bank", lambda m, t, k: _first(m, "Quantize").update(scale=1e-45)),
    "zero point -1": ("bank", lambda m, t, k: _first(m, "Quantize").update(zero_point=-1)),
    "zero point 256": ("bank", lambda m, t, k: _layer(m).update(out_zp=256)),
    "zero point 1e9": ("bank", lambda m, t, k: _first(m, "QAdd").update(zero_point=10**9)),
    "qmax 0": ("bank", lambda m, t, k: _layer(m).update(qmax=0)),
    "qmax 300": ("bank", lambda m, t, k: _first(m, "Quantize").update(qmax=300)),
    "unknown mode": ("bank", lambda m, t, k: _layer(m).update(mode="evil")),
    "unknown sampler": ("bank", lambda m, t, k: _layer(m).update(sampler="gibbs")),
    "max pool kernel 0": ("bank", lambda m, t, k: _first(m, "QMaxPool").update(kernel_size=0)),
    "flipout range missing": ("flipout", lambda m, t, k: _layer(m).pop("pert_scale")),
    "mu_q int16": ("bank", lambda m, t, k: t.update({"conv1.mu_q": t["conv1.mu_q"].to(torch.int16) * 300})),
    "mu_q float": ("bank", lambda m, t, k: t.update({"conv1.mu_q": t["conv1.mu_q"].float()})),
    "scales length 1": ("bank", lambda m, t, k: t.update({"conv2.mu_scale": t["conv2.mu_scale"][:1]})),
    "bias length 1": ("bank", lambda m, t, k: t.update({"fc.bias_q": t["fc.bias_q"][:1]})),
    "scale tensor NaN": ("bank", lambda m, t, k: t["conv1.sigma_scale"].fill_(math.nan)),
    "negative sigma": ("bank", lambda m, t, k: t["conv1.sigma_q"].fill_(-3)),
    "weights swapped": (
        "bank",
        lambda m, t, k: t.update({"conv1.mu_q": t["conv1.sigma_q"], "conv1.sigma_q": t["conv1.mu_q"]}),
    ),
    "channels do not fit": ("bank", lambda m, t, k: _first(m, "QAdaptiveAvgPool").update(output_size=2)),
    # hang / memory
    "bank_size 1e9": ("bank", lambda m, t, k: _layer(m).update(bank_size=10**6)),
    "flipout bank 1e5": (
        "flipout",
        lambda m, t, k: [
            s["config"].update(bank_size=10**5) for s in m["modules"].values() if s["type"] == "QuantLayer"
        ],
    ),
    "noise_slots 1e5": (
        "fresh",
        lambda m, t, k: [
            s["config"].update(noise_slots=10**5) for s in m["modules"].values() if s["type"] == "QuantLayer"
        ],
    ),
    # unclear errors (KeyError, RecursionError, ...)
    "config field missing": ("bank", lambda m, t, k: _layer(m).pop("kind")),
    "module missing": ("bank", lambda m, t, k: m["modules"].pop("conv2")),
    "nodes not a list": ("bank", lambda m, t, k: m.update(nodes={"a": 1})),
    "edge to a later node": (
        "bank",
        lambda m, t, k: m["nodes"][1]["args"]["tuple"].__setitem__(0, {"node": "output"}),
    ),
    "deep nesting": (
        "bank",
        lambda m, t, k: m["nodes"][-2]["args"]["tuple"].append(json.loads("[" * 200 + "]" * 200)),
    ),
    "tensor missing": ("bank", lambda m, t, k: t.pop("conv1.mu_scale")),
    "stray tensor": ("bank", lambda m, t, k: t.update({"evil.mu_q": torch.zeros(2, dtype=torch.int8)})),
}


def test_each_attack_of_issue_28_is_refused(valid, tmp_path):
    """Every row of the issue's table: a clean ValueError naming the field; no payload runs, nothing crashes."""
    marker = tmp_path / "PWNED"
    cases, names = [], []
    for name, (base, edit) in ATTACKS.items():
        meta, tensors = _read(valid[base])
        tensors = {k: v.clone() for k, v in tensors.items()}
        edit(meta, tensors, marker)
        f = _write(tmp_path / f"{len(cases)}.qbdl", meta, tensors, mode="attacker")
        cases.append(
            {
                "file": str(f),
                "kind": "qbdl",
                "reference": str(valid[base]).replace(".qbdl", ".ref.safetensors"),
            }
        )
        names.append(name)
    # the swapped weights, again with the digests save_qbnn wrote: caught by the digests alone
    meta, tensors = _read(valid["bank"])
    tensors["conv2.mu_q"], tensors["conv2.sigma_q"] = tensors["conv2.sigma_q"], tensors["conv2.mu_q"]
    cases.append({"file": str(_write(tmp_path / "swap.qbdl", meta, tensors, mode="as-is")), "kind": "qbdl",
                  "reference": str(valid["bank"]).replace(".qbdl", ".ref.safetensors")})  # fmt: skip
    names.append("weights swapped (digests as saved)")
    out = run_worker(cases, tmp_path, timeout=300)
    assert not marker.exists(), "a payload ran"
    bad = {n: o for n, o in zip(names, out) if o["status"] != "error"}
    assert not bad, bad
    for n, o in zip(names, out):
        assert "expected" in o["message"] or "do not fit" in o["message"] or "GiB" in o["message"], (n, o)
        assert ".qbdl" in o["message"], (n, o["message"])  # names the file


# -- 2. structure-aware fuzzing of .qbdl files

NASTY = [0, -1, 1, 2, 127, 128, 255, 256, 300, 2**31, 10**9, -(2**63), 1e-45, -0.5, 0.5, 1e30, math.nan, math.inf,
         -math.inf, True, False, None, "", "mean", "sample", "bank", "fresh", "flipout", "fbgemm", "linear", "conv2d",
         "output", "x", [], {}, [0], [0, 0], [1, 1], [10**9, 10**9], {"node": "x"}, {"tuple": []},
         "__import__('os').system('touch PWNED')", 'a"); __import__("os").system("touch PWNED"); ("']  # fmt: skip


def _paths(obj, prefix=()):
    """Every path into a JSON document (containers and leaves)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def qbdl_case(draw, valid_meta: dict):
    """(base, mode, list of edits): JSON edits (set / delete / duplicate / retype) or tensor edits."""
    base = draw(st.sampled_from(sorted(valid_meta)))
    meta, tensors = valid_meta[base]
    mode = draw(st.sampled_from(["as-is", "attacker", "legacy"]))
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            paths = [p for p in _paths(meta) if p and p[0] != "format"]
            path = draw(st.sampled_from(paths))
            op = draw(st.sampled_from(["set", "delete", "duplicate", "retype"]))
            edits.append(("json", op, path, draw(st.sampled_from(NASTY))))
        else:
            name = draw(st.sampled_from(sorted(tensors)))
            op = draw(st.sampled_from(["dtype", "shrink", "swap", "drop", "extreme", "add"]))
            other = draw(st.sampled_from(sorted(tensors)))
            value = draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, 1e-45, 127.0, -128.0]))
            dtype = draw(
                st.sampled_from(
                    [torch.int16, torch.int32, torch.float32, torch.float16, torch.int8, torch.uint8]
                )
            )
            edits.append(("tensor", op, name, (other, value, dtype)))
    return base, mode, edits


def _apply(meta: dict, tensors: dict, edits: list) -> None:
    for kind, op, where, arg in edits:
        if kind == "json":
            try:
                parent, key = _get(meta, where[:-1]), where[-1]
                cur = _get(meta, where)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit removed it
            if op == "set":
                parent[key] = copy.deepcopy(arg)
            elif op == "delete":
                del parent[key]
            elif op == "duplicate":
                if isinstance(parent, list):
                    parent.insert(key, copy.deepcopy(cur))
                else:
                    parent[f"{key}_dup"] = copy.deepcopy(cur)
            else:
                parent[key] = str(cur) if not isinstance(cur, str) else [cur]
        else:
            if where not in tensors:
                continue
            other, value, dtype = arg
            v = tensors[where]
            if op == "dtype":
                tensors[where] = v.to(dtype)
            elif op == "shrink":
                tensors[where] = v[: max(1, v.shape[0] // 2)].clone() if v.dim() else v
            elif op == "swap" and other in tensors:
                tensors[where], tensors[other] = tensors[other], v
            elif op == "drop":
                del tensors[where]
            elif op == "extreme":
                tensors[where] = (
                    v.clone().fill_(value)
                    if v.is_floating_point()
                    else v.clone().fill_(int(max(-128, min(127, value))) if math.isfinite(value) else 0)
                )
            elif op == "add":
                tensors[f"{where}x"] = v.clone()


def _fuzz_qbdl(valid, tmp_path, n: int, seed: int) -> Counter:
    valid_meta = {b: _read(valid[b]) for b in ("fresh", "bank", "flipout", "qdnn")}
    cases, modes = [], []

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=qbdl_case(valid_meta))
    def collect(case):
        base, mode, edits = case
        meta, tensors = (
            copy.deepcopy(valid_meta[base][0]),
            {k: v.clone() for k, v in valid_meta[base][1].items()},
        )
        _apply(meta, tensors, edits)
        f = tmp_path / f"case{len(cases)}.qbdl"
        try:
            _write(f, meta, tensors, mode)
        except (ValueError, TypeError, OverflowError):
            return  # safetensors refuses to write it (e.g. NaN in the JSON is fine, but a non-string key is not)
        cases.append(
            {
                "file": str(f),
                "kind": "qbdl",
                "reference": str(valid[base]).replace(".qbdl", ".ref.safetensors"),
            }
        )
        modes.append(mode)

    collect()
    out = run_worker(cases, tmp_path, timeout=60 + 5 * len(cases))
    counts = Counter((m, o["status"]) for m, o in zip(modes, out))
    print(
        f"qbdl fuzz: {len(cases)} crafted files tried; outcomes (mode, outcome): {dict(sorted(counts.items()))}"
    )
    assert not (tmp_path / "PWNED").exists() and not (Path.cwd() / "PWNED").exists(), "a payload ran"
    for m, o, c in zip(modes, out, cases):
        assert o["status"] in ("error", "same", "different"), (c, o)
        if m == "as-is":  # the digests save_qbnn wrote are intact: any edit must be refused
            assert o["status"] != "different", (c, o)
    return counts


def test_fuzz_qbdl_files(valid, tmp_path):
    counts = _fuzz_qbdl(valid, tmp_path, N_FUZZ, 0)
    assert (
        counts[("as-is", "error")] > 0
        and sum(v for (m, s), v in counts.items() if s == "error") > N_FUZZ // 2
    )


@pytest.mark.slow
def test_fuzz_qbdl_files_large(valid, tmp_path):
    _fuzz_qbdl(valid, tmp_path, 10 * N_FUZZ, 1)


# -- 3. stage files (.safetensors) that qbdl.run resumes from


def _stage_cases(valid, tmp_path: Path, n: int) -> list[dict]:
    raw = valid["stage"].read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + hlen]), raw[8 + hlen :]
    cases = []

    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        key=st.sampled_from(sorted(k for k in header if k != "__metadata__")),
        field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
        value=st.sampled_from(["F16", "I8", "BOOL", "X", [], [0], [10**12], [-1, 4], [0, 10**15], None, 7]),
        cut=st.sampled_from([None, 0, 8, len(raw) // 2, len(raw) - 1]),
    )
    def collect(key, field, value, cut):
        h = copy.deepcopy(header)
        if field is None:
            del h[key]
        else:
            h[key][field] = value
        hb = json.dumps(h).encode()
        data = struct.pack("<Q", len(hb)) + hb + body
        if cut is not None:
            data = raw[:cut]
        f = tmp_path / f"stage{len(cases)}.safetensors"
        f.write_bytes(data)
        cases.append(
            {
                "file": str(f),
                "kind": "stage",
                "reference": str(valid["stage"]).replace("bnn.safetensors", "stage.ref.safetensors"),
            }
        )

    collect()
    return cases


def test_fuzz_stage_files(valid, tmp_path):
    cases = _stage_cases(valid, tmp_path, 30)
    out = run_worker(cases, tmp_path, timeout=60 + 5 * len(cases))
    counts = Counter(o["status"] for o in out)
    print(f"stage fuzz: {len(cases)} crafted stage files tried; outcomes: {dict(counts)}")
    for c, o in zip(cases, out):
        assert o["status"] in ("error", "same"), (c, o)


def test_sampled_weight_memory_is_capped_and_the_cap_can_be_raised(valid, monkeypatch):
    """A bank within the entry limit but over the memory limit is refused naming the way to raise the limit."""
    from qbdl.quant import load_qbnn
    from qbdl.quant.schema import ModelFileError

    with pytest.raises(ModelFileError, match=r"over the limit of .*QBDL_MAX_SAMPLE_BYTES"):
        load_qbnn(valid["bank"], max_sample_bytes=1000)
    monkeypatch.setenv("QBDL_MAX_SAMPLE_BYTES", "1000")
    with pytest.raises(ModelFileError, match="max_sample_bytes"):
        load_qbnn(valid["bank"])
    monkeypatch.setenv("QBDL_MAX_SAMPLE_BYTES", "1e9")
    assert load_qbnn(valid["bank"]) is not None
