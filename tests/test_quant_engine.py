"""The plain-integer INT8 engine: its ops against PyTorch's deprecated quantized-tensor ops (the reference they
replace, run here only while torch still ships them), and a whole PTQ + evaluation that cannot bring them back."""

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qbdl.quant import native
from qbdl.quant.activations import QAdaptiveAvgPool, QAdd, QMaxPool, quantize_act
from qbdl.quant.backend import FULL_QMAX, REDUCED_QMAX, cpu_caps
from qbdl.quant.layers import QuantLayer

SRC = Path(__file__).resolve().parents[1] / "src" / "qbdl"


@pytest.fixture
def legacy():
    """PyTorch's quantized-tensor API as a reference, its deprecation warnings silenced; skipped once removed."""
    if not hasattr(torch, "quantize_per_tensor") or not hasattr(torch.ops.quantized, "add_relu"):
        pytest.skip("this torch no longer has quantized tensors to compare with")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = "x86"
        yield
        torch.backends.quantized.engine = old


def _q(u: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    return torch._make_per_tensor_quantized_tensor(u, scale, zp)


@pytest.mark.parametrize("scale,zp", [(0.25, 3), (0.25, 4), (0.0371, 117), (0.0213, 0), (1e-3, 255)])
def test_quantize_equals_quantize_per_tensor(legacy, scale, zp):
    g = torch.Generator().manual_seed(0)
    # random values, and exact ties (k + 1/2) * scale where the rounding order decides
    ties = (torch.randint(-300, 300, (5000,), generator=g).float() + 0.5) * scale
    x = torch.cat([torch.randn(100_003, generator=g) * 3, ties])
    ref = torch.quantize_per_tensor(x, scale, zp, torch.quint8).int_repr()
    assert torch.equal(quantize_act(x, scale, zp), ref)
    assert torch.equal(quantize_act(x, scale, zp, 127), ref.clamp(max=127))


def _add(relu, fmt, n=4, c=37, hw=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=g).contiguous(memory_format=fmt)
    b = torch.randint(0, 256, (n, c, hw, hw), dtype=torch.uint8, generator=g).contiguous(memory_format=fmt)
    m = QAdd(relu, 0.0517, 91)
    m.inputs = [(0.031, 17), (0.0427, 140)]
    return m, a, b


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_qadd_equals_quantized_add(legacy, relu, fmt):
    m, a, b = _add(relu, fmt)
    (sa, za), (sb, zb) = m.inputs
    op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
    ref = op(_q(a, sa, za), _q(b, sb, zb), m.scale, m.zero_point).int_repr()
    out = m(a, b)
    if native.available():
        # ATen's vector loop (fused multiply-add dequantization) covers all but the tail of 32 elements
        diff = (out.int() - ref.int()).abs()
        assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= 32, int((diff > 0).sum())
    m.qmax = 127
    assert int(m(a, b).max()) <= 127


def test_qadd_fallback_without_the_cpp_ops(legacy, monkeypatch):
    m, a, b = _add(True, torch.channels_last)
    with_native = m(a, b)
    monkeypatch.setattr(native, "available", lambda: False)
    diff = (m(a, b).int() - with_native.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("hw,size", [(8, 1), (7, 1), (2, 1), (9, (2, 3))])
def test_adaptive_avg_pool_equals_quantized_pool(legacy, fmt, hw, size):
    g = torch.Generator().manual_seed(hw)
    u = torch.randint(0, 256, (16, 64, hw, hw), dtype=torch.uint8, generator=g).contiguous(memory_format=fmt)
    ref = F.adaptive_avg_pool2d(_q(u, 0.05, 37), size).int_repr()
    m = QAdaptiveAvgPool(size)
    m.inputs = [(0.05, 37)]
    assert torch.equal(m(u), ref)


def test_max_pool_equals_quantized_pool_on_large_planes(legacy):
    u = torch.randint(0, 256, (2, 8, 112, 112), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last
    )
    ref = F.max_pool2d(_q(u, 0.05, 37), 3, 2, 1).int_repr()
    assert torch.equal(QMaxPool(2, 3, 2, 1)(u), ref)


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_conv_and_linear_equal_the_quantized_ops(legacy, kind):
    """A deterministic INT8 layer on plain tensors vs quantized::conv2d / linear (x86 engine) on the same ints.

    Not always bit-equal: the quantized ops fold input, weight and output scales into one float multiplier
    per channel, oneDNN's pointwise ops apply them as separate attributes; a product that lands within a float
    rounding of a half-integer can round the other way (measured: at most 1 LSB, on ~1e-4 of the outputs).
    Inputs span the activation range the engine uses on this CPU: 0..255 with VNNI, 0..127 where oneDNN sums
    u8 x s8 pairs in int16 (full-range inputs saturate there: 43% of linear outputs off by up to 53 LSB).
    """
    qmax = FULL_QMAX if cpu_caps().onednn_vnni else REDUCED_QMAX
    g = torch.Generator().manual_seed(1)
    c_out = 48
    shape = (c_out, 32, 3, 3) if kind == "conv2d" else (c_out, 96)
    w = torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)
    ws = torch.rand(c_out, generator=g) * 0.01 + 1e-3
    bias_q = torch.randint(-2000, 2000, (c_out,), dtype=torch.int32, generator=g)
    xs, xz, os, oz = 0.043, 21, 0.37, 64
    cfg = {"kind": kind, "relu": True, "in_scale": xs, "in_zp": xz, "out_scale": os, "out_zp": oz,
           "backend": "x86"}  # fmt: skip
    if kind == "conv2d":
        cfg.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
        x = torch.randint(0, qmax + 1, (8, 32, 12, 12), dtype=torch.uint8, generator=g)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randint(0, qmax + 1, (64, 96), dtype=torch.uint8, generator=g)
    layer = QuantLayer(cfg, w, ws, bias_q=bias_q)
    out = layer(x)
    qw = torch._make_per_channel_quantized_tensor(w, ws.double(), torch.zeros(c_out, dtype=torch.long), 0)
    bias = bias_q.float() * xs * ws
    if kind == "conv2d":
        packed = torch.ops.quantized.conv2d_prepack(qw, bias, [1, 1], [1, 1], [1, 1], 1)
        ref = torch.ops.quantized.conv2d_relu(_q(x, xs, xz), packed, os, oz)
    else:
        ref = torch.ops.quantized.linear_relu(
            _q(x, xs, xz), torch.ops.quantized.linear_prepack(qw, bias), os, oz
        )
    diff = (out.int() - ref.int_repr().int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 2e-3, float((diff > 0).float().mean())


def test_no_qbdl_module_imports_torch_ao():
    """Statically: nothing under src/qbdl imports torch.ao or names a quantized dtype."""
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.ao"):
                offenders.append(f"{path.name}: from {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("torch.ao") for a in node.names):
                offenders.append(f"{path.name}: import torch.ao")
            elif isinstance(node, ast.Attribute) and node.attr in (
                "quint8",
                "qint8",
                "qint32",
                "quantize_per_tensor",
            ):
                offenders.append(f"{path.name}:{node.lineno}: torch.{node.attr}")
    assert not offenders, offenders
    assert "QUInt8" not in (SRC / "quant" / "csrc" / "inplace.cpp").read_text()


E2E = textwrap.dedent(
    """
    import warnings
    # the deprecations of quantized tensors and of torch.ao.quantization become errors
    warnings.filterwarnings("error", message=".*quantized tensor creation functions.*")
    warnings.filterwarnings("error", message=".*torch.ao.quantization.*")
    warnings.filterwarnings("error", category=DeprecationWarning, module="torch")
    import torch
    from torch import nn
    from qbdl.bayes import dnn_to_bnn
    from qbdl.experiment.evaluate import Variant, evaluate_variants
    from qbdl.models.resnet import resnet20
    from qbdl.quant import convert_qat, load_qbnn, prepare_qat, quantize_bnn, save_qbnn

    torch.manual_seed(0)
    dnn = resnet20(num_classes=4).eval()
    bnn = dnn_to_bnn(dnn).eval()
    calib = [(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))) for _ in range(2)]
    test = [(torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,)))]
    ood = {"noise": [(torch.rand(6, 3, 32, 32), torch.zeros(6, dtype=torch.long))]}
    models = {"qdnn": quantize_bnn(dnn, calib, mc_samples=1, observer="histogram")}
    for sampler, kernel in (("fresh", "auto"), ("fresh", "prepack"), ("bank", "auto"), ("flipout", "auto")):
        models[sampler + kernel] = quantize_bnn(bnn, calib, sampler=sampler, fresh_kernel=kernel, bank_size=2, mc_samples=2)
    qat = prepare_qat(bnn).train()
    with torch.no_grad():
        qat(calib[0][0])  # the activation ranges
    models["qat"] = convert_qat(qat.eval())
    save_qbnn(models["bankauto"], "m.qbdl")
    models["loaded"] = load_qbnn("m.qbdl")
    variants = [Variant(n, q, 1 if n == "qdnn" else 3, 0) for n, q in models.items()]
    results = evaluate_variants(
        variants, test, ood, seed=1, target_accuracy=0.9, n_bins=5, score="entropy",
        temperature_scaled=["qdnn", "freshauto"], val_loader=calib,
    ).metrics
    assert all(0 <= r["accuracy"] <= 1 for r in results.values()), results
    print("ok", sorted(results))
    """
)


def test_whole_ptq_and_evaluation_raise_no_quantized_tensor_deprecation(tmp_path):
    r = subprocess.run([sys.executable, "-c", E2E], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


@pytest.mark.parametrize(
    "k,s,p,d,ceil,hw",
    [
        (3, 2, 1, 1, False, 112),
        (2, 2, 0, 1, True, 7),
        (3, 1, 1, 2, False, 9),
        ((3, 2), (2, 1), (1, 0), 1, True, 10),
    ],
)
def test_max_pool_kernel_equals_torch_on_every_window_rule(k, s, p, d, ceil, hw):
    g = torch.Generator().manual_seed(3)
    u = torch.randint(0, 256, (2, 24, hw, hw + 3), dtype=torch.uint8, generator=g)
    ref = F.max_pool2d(u.float(), k, s, p, d, ceil).to(torch.uint8)
    for x in (u, u.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(QMaxPool(2, k, s, p, d, ceil)(x), ref)


class _Branchy(torch.nn.Module):
    """A ReLU that cannot fuse (its input has two users), a max pool, an adaptive pool by function."""

    def __init__(self, mid: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc, self.mid = (
            torch.nn.MaxPool2d(2),
            torch.nn.Linear(8, 3),
            mid or torch.nn.Identity(),
        )

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(torch.relu(a)) + a
        b = self.mid(self.pool(b))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(b, 1), 1))


def test_unfused_relu_and_pools_run_on_integers():
    from qbdl.quant import QReLU, convert, prepare
    from qbdl.quant.ptq import calibrate

    torch.manual_seed(0)
    net = _Branchy().eval()
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    q = convert(calibrate(prepare(net), calib))
    kinds = {type(m).__name__ for m in q.modules()}
    assert {"QReLU", "QMaxPool", "QAdaptiveAvgPool", "QAdd"} <= kinds
    relu = next(m for m in q.modules() if isinstance(m, QReLU))
    assert relu.inputs[0][1] > 0  # clamps at the zero point of a signed activation, not at 0
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        out, ref = q(x), net(x)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_an_op_without_an_integer_version_is_refused_by_name():
    from qbdl.quant import convert, prepare
    from qbdl.quant.ptq import calibrate

    net = _Branchy(torch.nn.Sigmoid()).eval()
    prep = calibrate(prepare(net), [torch.randn(4, 3, 12, 12)])
    with pytest.raises(NotImplementedError, match="Sigmoid meets a uint8 activation.*run the rest in FP32"):
        convert(prep)


@pytest.mark.parametrize("dim", [1, 3])
def test_conv1d_and_conv3d_equal_the_integer_reference(dim):
    """conv1d runs as a height-1 conv2d, conv3d with its ReLU applied after the kernel: every call equals the
    int32 reference (double conv of the traced integers, rescale, round) to 1 LSB, and the net tracks FP32."""
    from qbdl.bayes import dnn_to_bnn
    from qbdl.quant import convert, prepare, quant_layers
    from qbdl.quant.ptq import calibrate

    conv, fn = {1: (torch.nn.Conv1d, F.conv1d), 3: (torch.nn.Conv3d, F.conv3d)}[dim]
    shape = {1: (4, 3, 20), 3: (2, 3, 6, 6, 6)}[dim]
    torch.manual_seed(0)
    net = torch.nn.Sequential(conv(3, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 4, 3, stride=2)).eval()
    x = torch.randn(*shape)
    for model, sampler in ((net, "bank"), (dnn_to_bnn(net, moped_delta=0.05).eval(), "fresh")):
        q = convert(calibrate(prepare(model), [torch.randn(*shape)], mc_samples=1), sampler=sampler)
        layers = quant_layers(q)
        assert [m.kind for m in layers] == [f"conv{dim}d"] * 2
        for m in layers:
            m.trace = []
        with torch.no_grad():
            out, ref = q(x), net(x)
        for m in layers:
            (t,) = m.trace
            c = t["config"]
            acc = fn(
                t["x"].double() - t["xz"], t["w"].double(), None, c["stride"], c["padding"], c["dilation"]
            )
            ws = t["ws"].double().view(1, -1, *[1] * dim)
            real = acc * t["xs"] * ws + (0 if t["bias"] is None else t["bias"].double().view(ws.shape))
            want = (torch.round(real / t["os"]) + t["oz"]).clamp(t["oz"] if t["relu"] else 0, t["qmax"])
            assert float((t["y"].double() - want).abs().max()) <= 1
        assert out.shape == ref.shape and (out - ref).norm() / ref.norm() < 0.15


def test_a_model_with_torch_ao_stubs_and_float_functional_still_converts():
    """torchvision's quantizable ResNet (QuantStub, DeQuantStub, FloatFunctional.add_relu) as a user's model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchvision.models import quantization as tvq

        torch.manual_seed(0)
        net = tvq.resnet18(weights=None, quantize=False, num_classes=5).eval()
    from qbdl.quant import convert, prepare, quant_layers
    from qbdl.quant.ptq import calibrate

    q = convert(calibrate(prepare(net), [torch.randn(4, 3, 32, 32)]))
    assert len(quant_layers(q)) == 21
    assert sum(type(m).__name__ == "QAdd" for m in q.modules()) == 8
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, ref = q(x), net(x)
    assert (out - ref).norm() / ref.norm() < 0.1
