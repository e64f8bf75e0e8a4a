"""INT8 exact on every ISA: every INT8 conv/linear equals an integer reference, with every sampler.

u8 x s8 kernels without VNNI (oneDNN below AVX512_CORE_VNNI / AVX2_VNNI) add pairs of products in int16 and
saturate on full-range activations. These tests fail on a CPU where qbdl's kernel plan is wrong for it: the
per-layer exactness checks run here on this CPU's own kernels, and `test_quant_suites_under_avx2_kernels`
re-runs this file and the other INT8 test files with oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) and qbdl's
sampling kernel too (QBDL_SAMPLE_KERNEL), so a VNNI (or VBMI) machine also runs the AVX2 kernels.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qbdl.bayes import dnn_to_bnn, mc_predict, sampling
from qbdl.quant import backend as qb
from qbdl.quant import convert, prepare, quant_layers, supported_backends
from qbdl.quant.ptq import calibrate

ENGINES = supported_backends()[:1]  # "x86" and "onednn" name the same oneDNN kernels
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "QBDL_SAMPLE_KERNEL": "avx2"}  # oneDNN and qbdl's sampler
ZEN1 = qb.caps_from({"avx", "avx2", "fma", "sse4_2"})
ICELAKE = qb.caps_from({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
ALDERLAKE = qb.caps_from({"avx2", "fma", "avx_vnni"})
DENSE = {"conv": ("conv2d", 1, True), "fc": ("linear", 1, True)}
DEPTHWISE = {**DENSE, "dw": ("conv2d", 64, False)}


# -- the decision, with injected capabilities


@pytest.mark.parametrize(
    "caps,backend,layers,qmax",
    [
        (ZEN1, "x86", DENSE, 127),
        (ZEN1, "onednn", {"det": ("conv2d", 1, False)}, 127),
        (ZEN1, "x86", DEPTHWISE, 127),
        (ICELAKE, "x86", DENSE, 255),
        (ICELAKE, "onednn", DEPTHWISE, 255),
        (ALDERLAKE, "x86", {"c": ("conv2d", 1, False)}, 255),  # AVX-VNNI (VEX): int32 accumulation too
    ],
)
def test_kernel_plan_for_injected_cpus(caps, backend, layers, qmax):
    plan = qb.kernel_plan(backend, layers, caps=caps)
    assert plan.qmax == qmax, plan
    assert plan.reduced == (qmax == 127)
    assert bool(plan.why) == plan.reduced
    assert plan.kernels == {name: ["onednn"] for name in layers}


@pytest.mark.parametrize(
    "flags,onednn_env,onednn_vnni",
    [
        (ICELAKE.flags, None, True),
        (ICELAKE.flags, "AVX2", False),
        (ICELAKE.flags, "AVX512_CORE", False),
        (ICELAKE.flags, "AVX512_CORE_VNNI", True),
        (ICELAKE.flags, "AVX2_VNNI", False),  # the VEX AVX-VNNI is not on this CPU
        (ALDERLAKE.flags, "AVX2_VNNI", True),
        (ZEN1.flags, None, False),
    ],
)
def test_caps_follow_the_isa_cap(flags, onednn_env, onednn_vnni):
    assert qb.caps_from(flags, onednn_env).onednn_vnni == onednn_vnni


@pytest.mark.parametrize("kind,depthwise", [("conv2d", False), ("conv2d", True), ("linear", False)])
def test_rule_matches_the_kernel_on_this_cpu(kind, depthwise):
    """The capability rule predicts what this CPU's kernels really do on all-255 x 127 data."""
    caps = qb.cpu_caps()
    rule = qb.full_range_exact(kind, 32 if depthwise else 1, caps)
    probe = qb.probe_full_range(kind, depthwise)
    if rule:
        assert probe  # the rule never calls a saturating kernel safe
    if not depthwise:  # oneDNN's depthwise kernel is exact without VNNI too: the rule is conservative there
        assert probe == rule


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_removed_engines_are_refused_with_the_fix(backend):
    dnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with pytest.raises(ValueError, match="deprecated quantized tensors.*Use backend 'x86'"):
        prepare(dnn, backend=backend)


# -- per-layer exactness against an integer reference


class _Net(nn.Module):
    """Long reductions (3x3x512), a depthwise conv, a linear; weights near +-max so int8 weights sit at +-127."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(512, 64, 3, padding=1)
        self.dw = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc = nn.Linear(64 * 16, 10)
        for m in (self.conv, self.dw, self.fc):
            mag = torch.empty(m.weight.shape).uniform_(0.9, 1.0, generator=g)
            sign = torch.randint(0, 2, m.weight.shape, generator=g) * 2 - 1
            m.weight.data = mag * sign / m.weight[0].numel() ** 0.5

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = self.dw(x)
        return self.fc(torch.flatten(x, 1))


def _data(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 512, 4, 4, generator=torch.Generator().manual_seed(seed)) * 4 - 1


def _reference(t: dict) -> torch.Tensor:
    """Integer reference: int32 accumulation of (x - zx) * w, float rescale + bias, round, clamp."""
    x = t["x"].double() - t["xz"]
    w = t["w"].double()
    c = t["config"]
    if t["kind"] == "linear":
        acc = x @ w.T
        ws = t["ws"].double().view(1, -1)
    else:
        x = x.contiguous()
        acc = F.conv2d(x, w, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        ws = t["ws"].double().view(1, -1, 1, 1)
    real = acc * (t["xs"] * ws)
    if t["bias"] is not None:
        real = real + t["bias"].double().view(ws.shape)
    lo = t["oz"] if t["relu"] else 0
    return (torch.round(real / t["os"]) + t["oz"]).clamp(lo, 255).clamp(max=t["qmax"])


def _check_trace(model: nn.Module, x: torch.Tensor, what: str) -> int:
    layers = quant_layers(model)
    for m in layers:
        m.trace = []
    with torch.no_grad():
        model(x)
    n = 0
    for m in layers:
        for t in m.trace:
            assert int(t["x"].max()) <= t["qmax"] or t["qmax"] == 255
            diff = (t["y"].double() - _reference(t)).abs()
            assert float(diff.max()) <= 1, (what, m.config["index"], t["kind"], float(diff.max()))
            assert float((diff > 0).double().mean()) < 0.02, (what, m.config["index"])
            n += 1
        m.trace = None
    return n


@pytest.fixture(scope="module")
def prepared():
    dnn = _Net().eval()
    bnn = dnn_to_bnn(dnn, moped_delta=0.2, prior_sigma=0.1).eval()
    calib = [_data(8, 1)]
    out = {}
    for engine in ENGINES:
        pd = calibrate(prepare(dnn, backend=engine), calib)
        pb = calibrate(prepare(bnn, backend=engine), calib, mc_samples=2)
        pf = calibrate(prepare(bnn, backend=engine, per_example=True), calib, mc_samples=2)
        out[engine] = (pd, pb, pf)
    return out


def _samplers(engine: str) -> list[tuple[str, str]]:
    samplers = [("fresh", "auto"), ("fresh", "prepack"), ("bank", "auto")]
    if engine in ("x86", "onednn"):
        samplers.append(("flipout", "auto"))
    return samplers


@pytest.mark.parametrize("engine", ENGINES)
def test_every_int8_layer_equals_the_integer_reference(prepared, engine):
    pd, pb, pf = prepared[engine]
    x = _data(6, 2)  # in the calibrated range: activations spread over the whole 0..qmax
    q = convert(pd)
    assert _check_trace(q, x, f"{engine} qdnn") == 3
    for sampler, kernel in _samplers(engine):
        q = convert(pf if sampler == "flipout" else pb, sampler=sampler, bank_size=2, fresh_kernel=kernel)
        with sampling(q, "mean"):
            assert _check_trace(q, x, f"{engine} {sampler} mean") >= 3
        for batch in (1, 6):
            torch.manual_seed(batch)
            assert _check_trace(q, x[:batch], f"{engine} {sampler}/{kernel} b={batch}") >= 3


@pytest.mark.parametrize("engine", ENGINES)
def test_activations_are_full_range_where_exact(prepared, engine):
    """0..255 where every kernel of every layer is exact on this CPU (VNNI, and its probes pass) and only there."""
    _, pb, _ = prepared[engine]
    q = convert(pb)
    meta, caps = q.qbdl_meta, qb.cpu_caps()
    assert set(meta["kernels"]) == {"conv", "dw", "fc"}
    exact = caps.onednn_vnni and all(
        qb.probe_full_range(k, d) for k, d in [("conv2d", 0), ("conv2d", 1), ("linear", 0)]
    )
    assert meta["activation_qmax"] == (255 if exact else 127)
    assert all(m.qmax == meta["activation_qmax"] for m in quant_layers(q))


# -- end to end: the digits resnet20 keeps its accuracy on every backend x sampler


@pytest.mark.parametrize("engine", ENGINES)
def test_digits_int8_keeps_accuracy(digits_nets, engine):
    """qdnn within 0.5 pt of dnn and the QBNN's mean net within 0.5 pt of the BNN's (both deterministic)."""
    dnn, bnn, train, xte, yte = digits_nets
    with torch.no_grad():
        acc_dnn = (dnn(xte).argmax(1) == yte).double().mean().item()
    pd = calibrate(prepare(dnn, backend=engine), train[:4])
    with torch.no_grad():
        acc_q = (convert(pd)(xte).argmax(1) == yte).double().mean().item()
    assert acc_dnn > 0.9
    assert abs(acc_q - acc_dnn) <= 0.005 + 1e-9, (engine, acc_dnn, acc_q)
    s = 8
    p_bnn = mc_predict(bnn, xte, s, seed=3).mean(0)
    acc_bnn = (p_bnn.argmax(1) == yte).double().mean().item()
    with torch.no_grad(), sampling(bnn, "mean"):
        acc_mean = (bnn(xte).argmax(1) == yte).double().mean().item()
    for sampler, kernel in _samplers(engine):
        pb = calibrate(
            prepare(bnn, backend=engine, per_example=sampler == "flipout"), train[:4], mc_samples=2
        )
        q = convert(pb, sampler=sampler, fresh_kernel=kernel)
        with torch.no_grad(), sampling(q, "mean"):
            acc_qmean = (q(xte).argmax(1) == yte).double().mean().item()
        assert abs(acc_qmean - acc_mean) <= 0.005 + 1e-9, (engine, sampler, acc_mean, acc_qmean)
        acc_qbnn = (mc_predict(q, xte, s, seed=3).mean(0).argmax(1) == yte).double().mean().item()
        # Sampled: QBNN and BNN draw different noise, so their gap has MC noise of its own (8 samples: the
        # BNN alone spans 1.1 pt over MC seeds 0-7 here); the saturation bug cost 5-11 pt.
        assert abs(acc_qbnn - acc_bnn) <= 0.012 + 1e-9, (engine, sampler, kernel, acc_bnn, acc_qbnn)


# -- the same files on the non-VNNI kernels


@pytest.mark.skipif(
    not qb.cpu_caps().onednn_vnni,
    reason="this process already runs the non-VNNI kernels (an AVX2 CPU, or the capped re-run itself)",
)
def test_quant_suites_under_avx2_kernels(tmp_path):
    """Re-run the INT8 test files with oneDNN and the sampling kernel capped at AVX2 (no-op caps on an AVX2 CPU)."""
    here = Path(__file__).parent
    files = [
        "test_quant_isa.py",
        "test_quant_engine.py",
        "test_quant_inplace.py",
        "test_quant_flipout.py",
        "test_quant_digits.py",
        "test_quant.py",
        "test_quant_io_compat.py",
        "test_memory.py",
        "test_quant_kernel_vector.py",
    ]
    env = {**os.environ, **AVX2_ENV}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *[str(here / f) for f in files]],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=1500,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    child = subprocess.run(
        [sys.executable, "-c", "import json; from qbdl.quant.backend import cpu_caps; print(json.dumps(cpu_caps().as_dict()))"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert '"onednn_vnni": false' in child.stdout


def test_full_range_file_loads_exact_on_a_cpu_that_needs_reduced_range(prepared, tmp_path, monkeypatch):
    """A .qbdl saved with 0..255 activations, loaded where the kernels saturate: moved to 0..127, still exact."""
    from qbdl.quant import load_qbnn, save_qbnn

    engine = "onednn" if "onednn" in ENGINES else ENGINES[0]
    _, pb, _ = prepared[engine]
    monkeypatch.setattr(qb, "cpu_caps", lambda: ICELAKE)  # saved on a VNNI CPU (whose probes pass)
    monkeypatch.setattr(qb, "probe_full_range", lambda *a: True)
    q = convert(pb, sampler="bank", bank_size=2)
    assert q.qbdl_meta["activation_qmax"] == 255
    save_qbnn(q, tmp_path / "m.qbdl")
    monkeypatch.setattr(qb, "cpu_caps", lambda: ZEN1)  # loaded on an AVX2 CPU without VNNI
    with pytest.warns(RuntimeWarning, match="0..127"):
        q2 = load_qbnn(tmp_path / "m.qbdl")
    assert q2.qbdl_meta["activation_qmax"] == 127 and all(m.qmax == 127 for m in quant_layers(q2))
    x = _data(6, 4)
    assert _check_trace(q2, x, "loaded") == 3
    monkeypatch.undo()
    q3 = convert(pb, sampler="bank", bank_size=2)  # quantized for this CPU's own kernels: exact here too
    with torch.no_grad(), sampling(q3, "mean"), sampling(q2, "mean"):
        a, b = q3(x), q2(x)
    assert ((a - b).norm() / a.norm()) < 0.05
