"""The vectorized fresh-sampling kernel (csrc/inplace.cpp) against its scalar reference, bit for bit.

The scalar reference is the kernel as it was before vectorization (torch.ops.qbdl.sample_plain_scalar runs it
in any build), so equality here means the samples of a seed, layer and MC index did not change.
"""

import pytest
import torch

from qbdl.quant import native, noise
from qbdl.quant.inplace import PackedSampler, discover_layout, expected_bytes, repeated_blocks

pytestmark = pytest.mark.skipif(not native.available(), reason="qbdl's C++ ops are not built here")

SHIFTS = (noise.MU16_SHIFT, noise.SHIFT16)


def _both(mu, sg, table, key, mu_shift, shift):
    args = (mu, sg, table, noise.to_int64(key), mu_shift, shift)
    return torch.ops.qbdl.sample_plain(*args), torch.ops.qbdl.sample_plain_scalar(*args)


def test_the_vector_kernel_is_the_one_built_where_torch_has_avx2():
    # native.py passes -mavx2 for these capabilities: without it the build silently runs the scalar kernel
    isa = torch.ops.qbdl.sample_isa()
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert isa == "avx2"
    else:
        assert isa in ("avx2", "scalar")


def test_every_length_around_the_32_weight_step_equals_the_reference():
    # the vector loop takes 32 weights a step and leaves the tail to the scalar code
    g = torch.Generator().manual_seed(0)
    for n in range(0, 200):
        mu = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16, generator=g)
        sg = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16, generator=g)
        key = int(torch.randint(0, 2**62, (1,), generator=g)) * 4 + n % 4
        fast, ref = _both(mu, sg, noise.z_table(), key, *SHIFTS)
        assert torch.equal(fast, ref), n


def test_random_shapes_seeds_layers_and_mc_indices_equal_the_reference():
    g = torch.Generator().manual_seed(1)
    for case in range(60):
        dims = int(torch.randint(1, 5, (1,), generator=g))
        shape = tuple(torch.randint(1, 9 if case % 2 else 70, (dims,), generator=g).tolist())
        mu = torch.randn(shape, generator=g) * 0.05
        sigma = torch.rand(shape, generator=g) * 0.02
        scale = noise.sample_scale(mu.view(shape[0], -1), sigma.view(shape[0], -1))
        mu16, sg16 = noise.operands(mu, sigma, scale)
        seed, layer, mc = (int(v) for v in torch.randint(0, 2**31, (3,), generator=g))
        for k in (noise.key(seed, layer % 60, mc % 64), noise.key(seed, layer, mc, random=True)):
            fast, ref = _both(mu16, sg16, noise.z_table(), k, *SHIFTS)
            assert fast.shape == mu16.shape and torch.equal(fast, ref), (case, shape, seed, layer, mc)
    # and the reference itself is the torch one (so the vector kernel is too)
    k = noise.key(3, 4, 5)
    assert torch.equal(torch.ops.qbdl.sample_plain(mu16, sg16, noise.z_table(), noise.to_int64(k), *SHIFTS),
                       noise.sample_reference(mu16, sg16, k))  # fmt: skip


def test_any_operands_table_and_shifts_equal_the_reference():
    # full int16 range (both clamps, int16 and int8 saturation of the packs), every allowed shift, and a table
    # that is not monotone (every byte, the last entry included, is read as the reference reads it)
    g = torch.Generator().manual_seed(2)
    table = torch.randint(0, 256, (1 << noise.TABLE_BITS,), dtype=torch.uint8, generator=g)
    table[-1] = 255
    n = 70_001
    mu = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16, generator=g)
    sg = torch.randint(-(2**15), 2**15, (n,), dtype=torch.int16, generator=g)
    mu[:64], sg[:64] = -(2**15), -(2**15)  # the extreme products
    mu[64:128], sg[64:128] = 2**15 - 1, 2**15 - 1
    seen = set()
    for mu_shift in range(0, 9):
        for shift in range(1, 17):
            key = int(torch.randint(0, 2**62, (1,), generator=g)) * 4 + mu_shift % 4  # all 64 bits
            fast, ref = _both(mu, sg, table, key, mu_shift, shift)
            assert torch.equal(fast, ref), (mu_shift, shift)
            seen.update(torch.unique(ref).tolist())
    assert {-127, 127, 0} <= seen  # the clamps and the middle were exercised


def _pack(shape, x_zp):
    if len(shape) == 2:  # oneDNN's linear: channel sums whenever packed for a batch shape
        return lambda w: torch.ops.onednn.qlinear_prepack(w, [1, shape[1]])
    ws = torch.full((shape[0],), 0.01)
    return lambda w: torch.ops.onednn.qconv_prepack(
        w, ws, 0.05, x_zp, [1, 1], [1, 1], [1, 1], 1, [2, shape[1], 9, 9]
    )


@pytest.mark.parametrize(
    "shape, x_zp", [((64, 3, 7, 7), 10), ((96, 64, 3, 3), 0), ((10, 16, 1, 1), 3), ((100, 256), 0)]
)
def test_the_packed_kernel_writes_the_reference_sample_in_packed_order(shape, x_zp):
    # sample_packed hashes packed positions: its data bytes are the reference sample of the packed operands,
    # and its channel sums (blockwise where blocks repeat) are those of the sample it wrote
    pack = _pack(shape, x_zp)
    layout = discover_layout(pack, shape)
    assert layout is not None
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(shape, generator=g) * 0.05
    sigma = torch.rand(shape, generator=g) * 0.02
    mu16, sg16 = noise.operands(mu, sigma, noise.sample_scale(mu, sigma))
    sampler = PackedSampler(pack, layout, mu16, sg16)
    for mc in range(4):
        k = noise.key(7, 2, mc)
        data = torch.ops.qbdl.packed_bytes(sampler.sample(k))[: layout.data_bytes].view(torch.int8)
        ref = torch.ops.qbdl.sample_plain_scalar(
            sampler.mu, sampler.sg, noise.z_table(), noise.to_int64(k), *SHIFTS
        )
        assert torch.equal(data, ref), mc
        w = sampler.unpacked(sampler.packed, shape)
        assert torch.equal(torch.ops.qbdl.packed_bytes(sampler.packed), expected_bytes(layout, w)), mc


@pytest.mark.parametrize("shape, x_zp", [((100, 256), 0), ((100, 64, 1, 1), 3)])
def test_channel_sums_blockwise_equal_bytewise(shape, x_zp):
    # blocks of channels repeated over the inputs, padded channels (100 -> oneDNN's block): both C++ paths
    layout = discover_layout(_pack(shape, x_zp), shape)
    assert layout is not None
    g = torch.Generator().manual_seed(5)
    mu16 = torch.randint(-9000, 9000, shape, dtype=torch.int16, generator=g)
    sg16 = torch.randint(0, 6000, shape, dtype=torch.int16, generator=g)
    sampler = PackedSampler(_pack(shape, x_zp), layout, mu16, sg16)
    if not layout.n_comp:  # oneDNN's AVX2 linear keeps no channel sums: nothing to sum, nothing kept for it
        assert len(shape) == 2 and sampler.oc.numel() == 0 and (sampler.reps, sampler.block) == (1, 1)
        return
    assert sampler.reps > 1 and sampler.oc.numel() * sampler.reps == sampler.mu.numel()
    k = noise.to_int64(noise.key(1, 2, 3))
    args = (sampler.mu, sampler.sg)
    blockwise = torch.ops.qbdl.packed_bytes(sampler.sample(noise.key(1, 2, 3))).clone()
    full = sampler.oc.view(-1, 1, sampler.block).expand(-1, sampler.reps, -1).reshape(-1).contiguous()
    torch.ops.qbdl.sample_packed(
        sampler.packed, *args, full, sampler.n_comp, 1, 1, noise.z_table(), k, *SHIFTS
    )
    assert torch.equal(torch.ops.qbdl.packed_bytes(sampler.packed), blockwise)
    assert torch.equal(blockwise, expected_bytes(layout, sampler.unpacked(sampler.packed, shape)))
    with pytest.raises(RuntimeError, match="slot out of range"):
        bad = sampler.oc.clone()
        bad[-1] = sampler.n_comp
        torch.ops.qbdl.sample_packed(
            sampler.packed, *args, bad, sampler.n_comp, sampler.reps, sampler.block, noise.z_table(), k, *SHIFTS
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="oc must be"):
        torch.ops.qbdl.sample_packed(
            sampler.packed, *args, sampler.oc, sampler.n_comp, sampler.reps + 1, sampler.block, noise.z_table(),
            k, *SHIFTS,
        )  # fmt: skip


def test_repeated_blocks_finds_the_repetition_or_keeps_every_slot():
    one = torch.arange(32, dtype=torch.int16).repeat_interleave(2)  # a block: 32 channels x 2 bytes
    slots = torch.cat([one.repeat(3), (one + 32).repeat(3)])  # [G=2, reps=3, block=64]
    oc, reps, block = repeated_blocks(slots)
    assert (reps, block) == (3, 64) and torch.equal(oc, torch.cat([one, one + 32]))
    ragged = torch.cat([slots, one[:16]])  # not whole blocks
    assert repeated_blocks(ragged)[1:] == (1, 1) and torch.equal(repeated_blocks(ragged)[0], ragged)
