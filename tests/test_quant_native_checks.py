"""qbdl's C++ ops check their arguments before any arithmetic (issue 28 item 3), and a batch of 0 images gives
an empty result on every sampler (before: flip_requant / signed_add divided by N * C = 0, SIGFPE)."""

import pytest
import torch

from qbdl.bayes import dnn_to_bnn, sampling
from qbdl.models import resnet20
from qbdl.quant import calibrate, convert, native, noise, prepare

pytestmark = pytest.mark.skipif(not native.available(), reason="qbdl's C++ ops are not built here")


def _signs(n, c):
    return torch.ones(n, c, dtype=torch.int8)


@pytest.mark.parametrize("shape", [(0, 8), (0, 8, 5, 5), (2, 8, 0, 5)])
def test_flipout_ops_return_empty_on_empty_inputs(shape):
    x = torch.zeros(shape, dtype=torch.uint8)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    n, c = shape[0], shape[1]
    out = torch.ops.qbdl.flip_requant(x, _signs(n, c), 10, 0.5, 64)
    assert out.shape == x.shape and out.numel() == 0
    out = torch.ops.qbdl.signed_add(x, 0.1, 3, x, 0.2, 128, _signs(n, c), 0.3, 0, True)
    assert out.shape == x.shape and out.numel() == 0
    assert torch.ops.qbdl.qadd(x, 0.1, 0, x, 0.1, 0, 0.2, 0, False, 255).shape == x.shape


def test_flipout_ops_still_compute_exactly():
    # hand-computed: out = clamp(round(sign * (q - 10) * 0.5) + 64): q = 20 -> 69 (+1) / 59 (-1)
    x = torch.tensor([[20, 10], [30, 0]], dtype=torch.uint8)
    s = torch.tensor([[1, -1], [-1, 1]], dtype=torch.int8)
    assert torch.ops.qbdl.flip_requant(x, s, 10, 0.5, 64).tolist() == [[69, 64], [54, 59]]


@pytest.mark.parametrize(
    "args, match",
    [
        ((300, 0.5, 64), "in_zp"),
        ((10, 0.5, -1), "out_zp"),
        ((10, float("nan"), 64), "ratio"),
        ((10, 0.0, 64), "ratio"),
    ],
)
def test_flip_requant_refuses_bad_arguments(args, match):
    x = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.qbdl.flip_requant(x, _signs(2, 4), *args)


def test_signed_add_and_qadd_refuse_bad_arguments():
    x = torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="so"):
        torch.ops.qbdl.signed_add(x, 0.1, 3, x, 0.2, 128, _signs(2, 4), float("inf"), 0, True)
    with pytest.raises(RuntimeError, match="zb"):
        torch.ops.qbdl.signed_add(x, 0.1, 3, x, 0.2, 256, _signs(2, 4), 0.3, 0, True)
    with pytest.raises(RuntimeError, match="signs"):
        torch.ops.qbdl.signed_add(x, 0.1, 3, x, 0.2, 128, _signs(3, 4), 0.3, 0, True)
    with pytest.raises(RuntimeError, match="qmax"):
        torch.ops.qbdl.qadd(x, 0.1, 0, x, 0.1, 0, 0.2, 0, False, 0)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.qbdl.qadd(x, -0.1, 0, x, 0.1, 0, 0.2, 0, False, 255)


def test_max_pool_refuses_zero_kernel_or_stride():
    x = torch.zeros(1, 4, 6, 6, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="kernel, stride"):
        torch.ops.qbdl.max_pool2d_u8(x, 0, 2, 2, 2, 0, 0, 1, 1, 3, 3)
    with pytest.raises(RuntimeError, match="kernel, stride"):
        torch.ops.qbdl.max_pool2d_u8(x, 2, 2, 0, 2, 0, 0, 1, 1, 3, 3)
    assert (
        torch.ops.qbdl.max_pool2d_u8(
            torch.zeros(0, 4, 6, 6, dtype=torch.uint8), 2, 2, 2, 2, 0, 0, 1, 1, 3, 3
        ).shape[0]
        == 0
    )


def _packed_args():
    w = torch.zeros(16, 8, 3, 3, dtype=torch.int8)
    packed = torch.ops.onednn.qconv_prepack(
        w, torch.full((16,), 0.01), 0.05, 3, [1, 1], [1, 1], [1, 1], 1, [1, 8, 6, 6]
    )
    total = int(torch.ops.qbdl.packed_bytes(packed).numel())
    n = total - 4 * 16  # zero point 3: one int32 channel sum per output channel after the data
    mu, sg, oc = (torch.zeros(n, dtype=torch.int16) for _ in range(3))
    return packed, mu, sg, oc


def test_sample_kernels_refuse_bad_operands():
    packed, mu, sg, oc = _packed_args()
    t, sh = noise.z_table(), (noise.MU16_SHIFT, noise.SHIFT16)
    torch.ops.qbdl.sample_packed(packed, mu, sg, oc, 16, 1, 1, t, 0, *sh)  # the valid call
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.qbdl.sample_packed(packed, mu, sg, oc.clone().fill_(16), 16, 1, 1, t, 0, *sh)
    with pytest.raises(RuntimeError, match="layout does not match"):
        torch.ops.qbdl.sample_packed(packed, mu[:-4], sg[:-4], oc[:-4], 16, 1, 1, t, 0, *sh)
    with pytest.raises(RuntimeError, match="oc must be"):
        torch.ops.qbdl.sample_packed(packed, mu, sg, oc[:5], 16, 1, 1, t, 0, *sh)
    with pytest.raises(RuntimeError, match="table"):
        torch.ops.qbdl.sample_packed(packed, mu, sg, oc, 16, 1, 1, t[:100], 0, *sh)
    with pytest.raises(RuntimeError, match="shifts"):
        torch.ops.qbdl.sample_packed(packed, mu, sg, oc, 16, 1, 1, t, 0, 7, 40)
    with pytest.raises(RuntimeError, match="int16"):
        torch.ops.qbdl.sample_plain(torch.zeros(4, 2), torch.zeros(4, 2), t, 0, *sh)
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.qbdl.sample_plain(mu[:4], sg[:5], t, 0, *sh)


@pytest.fixture(scope="module")
def prepared():
    torch.manual_seed(0)
    bnn = dnn_to_bnn(resnet20(num_classes=10, in_chans=3).eval(), moped_delta=0.1).eval()
    return calibrate(prepare(bnn, per_example=True), [torch.randn(4, 3, 16, 16)], mc_samples=1)


@pytest.mark.parametrize("sampler", ["fresh", "bank", "flipout"])
def test_a_batch_of_zero_images_gives_an_empty_result_on_every_sampler(prepared, sampler):
    q = convert(prepared, sampler=sampler, bank_size=2)
    empty = torch.empty(0, 3, 16, 16)
    with torch.no_grad():
        assert q(empty).shape == (0, 10)  # as the very first forward, too
        y = q(torch.randn(2, 3, 16, 16))
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        assert q(empty).shape == (0, 10)
        with sampling(q, "mean"):
            assert q(empty).shape == (0, 10)
