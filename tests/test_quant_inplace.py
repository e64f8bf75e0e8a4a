"""Fresh INT8 samples written into oneDNN-packed weights (qbdl.quant.inplace) against the re-packing path."""

import pytest
import torch
from torch import nn

from qbdl.bayes import dnn_to_bnn, mc_predict, sampling
from qbdl.models import resnet20
from qbdl.quant import calibrate, convert, native, prepare, quant_layers
from qbdl.quant.inplace import discover_layout, expected_bytes

SIZE = 16


@pytest.fixture(scope="module")
def prepared():
    torch.manual_seed(0)
    bnn = dnn_to_bnn(resnet20(num_classes=10, in_chans=3).eval(), moped_delta=0.1).eval()
    calib = [torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))]
    return calibrate(prepare(bnn, backend="x86"), calib, mc_samples=1, seed=0)


def _x(n=4, seed=5):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_native_ops_build_here():
    # CI has g++ and ninja (a project dependency): the fast path must not silently fall back there
    assert native.available()


def _conv_pack(shape, x_zp, x_shape, groups=1):
    ws = torch.rand(shape[0], generator=torch.Generator().manual_seed(0)) * 0.01 + 1e-3

    def pack(w):
        return torch.ops.onednn.qconv_prepack(w, ws, 0.05, x_zp, [1, 1], [1, 1], [1, 1], groups, x_shape)

    return pack


@pytest.mark.parametrize(
    "shape, x_zp, groups",
    [((64, 3, 7, 7), 10, 1), ((10, 16, 3, 3), 10, 1), ((32, 32, 3, 3), 0, 1), ((100, 64, 1, 1), 3, 1),
     ((16, 4, 3, 3), 10, 2), ((300, 1, 3, 3), 7, 300)],
)  # fmt: skip
def test_layout_is_measured_and_predicts_packed_bytes(shape, x_zp, groups):
    # grouped: with AMX oneDNN pads each group's 8 channel sums to 16, so channel c's sum is not int32 number c
    pack = _conv_pack(shape, x_zp, [8, shape[1] * groups, 12, 12], groups)
    layout = discover_layout(pack, shape)
    assert layout is not None
    # padding (input channels 3 -> 4, output channels 10 -> 16) is zero, every weight appears once
    n = torch.tensor(shape).prod().item()
    assert layout.data_bytes >= n and int((layout.src >= 0).sum()) == n
    assert layout.n_comp >= shape[0] if x_zp else layout.n_comp in (0, *range(shape[0], 4 * shape[0]))
    if layout.n_comp:  # one sum per channel, each in its own slot
        assert sorted(layout.comp_slot.tolist()) == sorted(set(layout.comp_slot.tolist()))
        assert len(layout.comp_slot) == shape[0] and int(layout.comp_slot.max()) < layout.n_comp
    for seed in range(3):
        w = torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(torch.ops.qbdl.packed_bytes(pack(w)), expected_bytes(layout, w))


def test_layout_rejects_packings_that_are_not_permutations():
    shape = (16, 8, 3, 3)
    pack = _conv_pack(shape, 5, [2, 8, 6, 6])
    assert discover_layout(lambda w: pack((w // 2).to(torch.int8)), shape) is None  # values changed
    assert discover_layout(lambda w: pack(torch.ones_like(w)), shape) is None  # ignores the weight


def _assert_every_layer_exact(q: nn.Module, batches: list[torch.Tensor]) -> None:
    """Every layer: the in-place forward equals the kernel run on the int8 sample it wrote, packed afresh."""
    layers = quant_layers(q)
    for xb in batches:
        inputs = {}
        hooks = [
            m.register_forward_pre_hook(lambda mod, a, d=inputs: d.__setitem__(mod, a[0])) for m in layers
        ]
        with torch.no_grad():
            q(xb)
        for h in hooks:
            h.remove()
        assert all(m.inplace_sampler is not None for m in layers), (
            "every conv2d/linear layer takes the in-place path"
        )
        assert any(m.in_zp != 0 for m in layers)  # the compensation bytes matter
        for m in layers:
            x = inputs[m]
            torch.manual_seed(7)
            with torch.no_grad():
                y = m(x)
            torch.manual_seed(7)
            _, _, eps_b = m.draw(None)
            w = m.inplace_sampler.unpacked(m.inplace_sampler.packed, tuple(m.mu_q.shape))
            packed, bias = m.prepack(w, m.w_scale, m.in_scale, m.in_zp), m.float_bias(eps_b)
            post = "relu" if m.relu else "none"
            expected = m.kernel(
                x, m.in_scale, m.in_zp, packed, m.w_scale.float(), bias, m.out_scale, m.out_zp, post
            )
            # identical kernels on VNNI; capped below VNNI, oneDNN may pick another implementation for either
            # packing (rounding order): the integers agree to 1 LSB, and exactly almost everywhere
            diff = (y.int() - expected.int().clamp(max=m.qmax)).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, (xb.shape, m)


def test_inplace_kernel_equals_eager_kernel_on_the_same_int8_weights(prepared):
    # the layout is measured on the first batch (4); a later batch of another size (9) must stay exact
    _assert_every_layer_exact(convert(prepared, sampler="fresh", seed=3), [_x(4), _x(9)])


def test_a_layout_that_does_not_check_out_warns_and_re_packs_the_same_samples(prepared, monkeypatch):
    # a CPU whose oneDNN packs some layer in a format that is not a permutation: never silent, still exact
    ref = convert(prepared, sampler="fresh", seed=3, fresh_kernel="prepack")
    q = convert(prepared, sampler="fresh", seed=3)
    monkeypatch.setattr("qbdl.quant.inplace.discover_layout", lambda pack, shape: None)
    with pytest.warns(RuntimeWarning, match="re-packed every forward"), torch.no_grad():
        torch.manual_seed(11)
        y = q(_x())
    torch.manual_seed(11)
    with torch.no_grad():
        assert torch.equal(y, ref(_x()))
    assert all(m.inplace_sampler is None and m.fresh_kernel == "prepack" for m in quant_layers(q) if m.bayesian)


def test_inplace_exact_on_grouped_depthwise_strided_dilated_convs():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 24, 1, stride=2), nn.ReLU(),
        nn.Conv2d(24, 8, 3, dilation=2, padding=2),
    ).eval()  # fmt: skip
    prep = calibrate(
        prepare(dnn_to_bnn(net, moped_delta=0.1).eval()), [torch.randn(4, 8, 10, 10)], mc_samples=1
    )
    _assert_every_layer_exact(convert(prep, sampler="fresh"), [torch.randn(3, 8, 10, 10)])


def test_inplace_spread_matches_sigma():
    torch.manual_seed(0)
    b = dnn_to_bnn(nn.Sequential(nn.Conv2d(32, 32, 3, bias=False), nn.ReLU()), moped_delta=0.05)
    prep = calibrate(prepare(b), [torch.randn(4, 32, 6, 6)], mc_samples=1)
    q = convert(prep, sampler="fresh", seed=0)
    with torch.no_grad():
        q(torch.randn(2, 32, 6, 6))
    layer = quant_layers(q)[0]
    assert layer.inplace_sampler is not None
    torch.manual_seed(123)
    step = layer.weight_scale().view(-1, 1, 1, 1)
    samples = torch.stack([layer.sampled_int8_weight().float() * step for _ in range(600)])
    sigma, mu = b[0].sigma_weight.detach(), b[0].mu_weight.detach()
    ratio = samples.std(0).pow(2).mean().sqrt() / sigma.pow(2).mean().sqrt()
    assert abs(ratio - 1) < 0.05, ratio
    assert ((samples.mean(0) - mu).abs() / step).mean() < 0.35


def test_inplace_and_prepack_kernels_agree_in_distribution(prepared):
    """Same model, both fresh kernels: MC mean predictions agree (the noise order differs, not its law)."""
    x = _x(16, seed=9)
    fast = convert(prepared, sampler="fresh", seed=3)
    slow = convert(prepared, sampler="fresh", seed=3, fresh_kernel="prepack")
    with torch.no_grad():
        pf = mc_predict(fast, x, 64, seed=1).softmax(-1).mean(0)
        ps = mc_predict(slow, x, 64, seed=1).softmax(-1).mean(0)
        with sampling(fast, "mean"):
            pm = fast(x).softmax(-1)
    assert all(m.inplace_sampler is not None for m in quant_layers(fast))
    assert all(m.inplace_sampler is None for m in quant_layers(slow))
    gap = (pf - ps).abs().max()
    assert gap < 0.08, gap
    # and they sample: MC means differ from the mean-weight prediction by far more than from each other
    assert (pf - pm).abs().max() > gap


def test_copy_and_reseed_rebuild_the_sampler(prepared):
    import copy

    q = convert(prepared, sampler="fresh", seed=3)
    x = _x()
    with torch.no_grad():
        q(x)
        c = copy.deepcopy(q)
        torch.manual_seed(1)
        a = q(x)
        torch.manual_seed(1)
        b = c(x)
    assert torch.equal(a, b)


def test_bad_fresh_kernel():
    with pytest.raises(ValueError, match="fresh_kernel"):
        convert(nn.Module(), fresh_kernel="jit")


_SUBPROCESS = """
import torch
from qbdl.bayes import dnn_to_bnn
from qbdl.models import resnet20
from qbdl.quant import calibrate, convert, native, prepare, quant_layers
torch.manual_seed(0)
bnn = dnn_to_bnn(resnet20(num_classes=10, in_chans=3).eval(), moped_delta=0.1).eval()
prep = calibrate(prepare(bnn, per_example=True), [torch.randn(4, 3, 16, 16)], mc_samples=1)
q = convert(prep, sampler="fresh")
with torch.no_grad():
    y = q(torch.randn(2, 3, 16, 16))
print("native", native.available(), "inplace", sum(m.inplace_sampler is not None for m in quant_layers(q)), y.shape[1])
try:
    convert(prep, sampler="flipout")
except ValueError as e:
    print("flipout refused:", "C++ ops" in str(e))
"""


def _run_subprocess(env_extra: dict) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_without_native_ops_fresh_sampling_falls_back_and_flipout_is_refused():
    text = _run_subprocess({"QBDL_NATIVE": "0"})
    assert "native False inplace 0 10" in text and "flipout refused: True" in text


def test_a_lock_left_by_a_killed_build_does_not_block(tmp_path):
    """A build killed mid-way leaves its lock file; the next start must not wait on it (torch holds an OS
    advisory lock on that file, which dies with the process)."""
    import os
    import shutil

    assert native.available()
    built = native.build_dir()
    copy = tmp_path / built.name
    shutil.copytree(built, copy)  # keeps mtimes: ninja finds the library up to date, nothing recompiles
    lock = copy / "lock"
    lock.touch()
    os.utime(lock, (1, 1))
    text = _run_subprocess({"QBDL_BUILD_DIR": str(tmp_path)})
    assert "native True inplace 22 10" in text
