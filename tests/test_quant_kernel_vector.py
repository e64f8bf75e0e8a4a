"""The vectorized fresh-sampling kernels (csrc/inplace.cpp, csrc/sample_vbmi.cpp) against their scalar reference,
bit for bit.

The scalar reference is the kernel as it was before vectorization (torch.ops.qbdl.sample_plain_kernel(...,
"scalar") runs it in any build), so equality here means the samples of a seed, layer and MC index did not change.
Every kernel this CPU runs is compared (sample_kernels()): AVX2 and, where the CPU has AVX-512 VBMI, the VBMI one.
"""

import os
import subprocess
import sys

import pytest
import torch

from qbdl.quant import backend, native, noise
from qbdl.quant.inplace import PackedSampler, discover_layout, expected_bytes, repeated_blocks

pytestmark = pytest.mark.skipif(not native.available(), reason="qbdl's C++ ops are not built here")

SHIFTS = (noise.MU16_SHIFT, noise.SHIFT16)


VBMI_FLAGS = {"avx512f", "avx512bw", "avx512vbmi"}


def _kernels(table=None):
    """The vector kernels to compare here (those this CPU runs; VBMI only for tables of the z table's shape)."""
    names = [k for k in torch.ops.qbdl.sample_kernels() if k != "scalar"]
    if table is not None and not _vbmi_shaped(table):
        names = [k for k in names if k != "avx512vbmi"]
    return names


def _vbmi_shaped(table) -> bool:
    return all(
        len(torch.unique(b)) <= 2 and bool((b[1:] - b[:-1]).le(1).all()) and bool((b[1:] >= b[:-1]).all())
        for first, width, count in ((0, 128, 228), (29184, 16, 208))
        for b in table[first : first + width * count].long().view(count, width)
    )


def _both(mu, sg, table, key, mu_shift, shift):
    """(sample_plain, the scalar reference) after checking every vector kernel against the reference."""
    args = (mu, sg, table, noise.to_int64(key), mu_shift, shift)
    ref = torch.ops.qbdl.sample_plain_kernel(*args, "scalar")
    for name in _kernels(table):
        assert torch.equal(torch.ops.qbdl.sample_plain_kernel(*args, name), ref), name
    return torch.ops.qbdl.sample_plain(*args), ref


def test_the_fastest_kernel_this_cpu_runs_is_the_one_used():
    # native.py passes -mavx2 for these capabilities (without it the build silently runs the scalar kernel); the
    # VBMI kernel is chosen at run time from the CPU's flags; QBDL_SAMPLE_KERNEL caps the choice
    flags = backend.cpu_flags()
    kernels = torch.ops.qbdl.sample_kernels()
    assert ("avx512vbmi" in kernels) == VBMI_FLAGS.issubset(flags)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert "avx2" in kernels
    cap = os.environ.get("QBDL_SAMPLE_KERNEL", "avx512vbmi")
    order = ["scalar", "avx2", "avx512vbmi"]
    expected = max((k for k in kernels if order.index(k) <= order.index(cap)), key=order.index)
    assert torch.ops.qbdl.sample_isa() == expected


def test_the_kernel_cap_picks_the_kernel_and_a_bad_one_is_refused():
    code = (
        "import torch; from qbdl.quant import native, noise; native.available(); "
        "mu = torch.arange(-500, 500, dtype=torch.int16) * 30; sg = torch.arange(1000, dtype=torch.int16) * 9; "
        "a = torch.ops.qbdl.sample_plain(mu, sg, noise.z_table(), 5, noise.MU16_SHIFT, noise.SHIFT16); "
        "r = torch.ops.qbdl.sample_plain_kernel(mu, sg, noise.z_table(), 5, noise.MU16_SHIFT, noise.SHIFT16, 'scalar'); "
        "print(torch.ops.qbdl.sample_isa(), torch.equal(a, r))"
    )  # fmt: skip
    avx2 = "avx2" if "avx2" in torch.ops.qbdl.sample_kernels() else "scalar"
    for cap, isa in (("scalar", "scalar"), ("avx2", avx2)):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "QBDL_SAMPLE_KERNEL": cap},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert out.stdout.split() == [isa, "True"], out.stdout
    bad = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "QBDL_SAMPLE_KERNEL": "avx9"}, capture_output=True, text=True
    )  # fmt: skip
    assert bad.returncode != 0 and "unknown sampling kernel 'avx9'" in bad.stderr
    for name in torch.ops.qbdl.sample_kernels():  # the table is checked before any kernel reads it
        with pytest.raises(RuntimeError, match="table must be the contiguous uint8"):
            torch.ops.qbdl.sample_plain_kernel(
                torch.zeros(4, dtype=torch.int16), torch.zeros(4, dtype=torch.int16), noise.z_table()[:100], 1, 7,
                15, name,
            )  # fmt: skip
    with pytest.raises(RuntimeError, match="unknown sampling kernel"):
        torch.ops.qbdl.sample_plain_kernel(
            torch.zeros(4, dtype=torch.int16), torch.zeros(4, dtype=torch.int16), noise.z_table(), 1, 7, 15, "sse"
        )  # fmt: skip


def test_every_length_around_the_vector_steps_equals_the_reference():
    # the vector loops take 32 (AVX2) or 64 (VBMI) weights a step and leave the tail to the scalar code
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


@pytest.mark.parametrize("which", ["random", "z"])
def test_any_operands_table_and_shifts_equal_the_reference(which):
    # full int16 range (both clamps, int16 and int8 saturation of the packs), every allowed shift, with a table
    # that is not monotone (every byte, the last entry included, is read as the reference reads it; the AVX2
    # kernel runs it) and with the z table (which the VBMI kernel runs where the CPU has it)
    g = torch.Generator().manual_seed(2)
    table = torch.randint(0, 256, (1 << noise.TABLE_BITS,), dtype=torch.uint8, generator=g)
    table[-1] = 255
    if which == "z":
        table = noise.z_table()
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
    # a table not of the z table's shape: the VBMI kernel, asked for by name, refuses it
    if which == "random" and "avx512vbmi" in torch.ops.qbdl.sample_kernels():
        with pytest.raises(RuntimeError, match="needs a table shaped as noise.z_table"):
            torch.ops.qbdl.sample_plain_kernel(mu, sg, table, 1, *SHIFTS, "avx512vbmi")


def test_the_vbmi_tables_follow_the_table_they_are_given():
    # the VBMI kernel re-expresses the z table as per-bucket (base, step position) and keeps them between calls:
    # tables of the same shape but other steps (in each of its three regions, then the z table again) must each
    # give the reference's samples, so the derived tables are rebuilt whenever the table's bytes change
    if "avx512vbmi" not in torch.ops.qbdl.sample_kernels():
        pytest.skip("this CPU has no AVX-512 VBMI")
    z = noise.z_table()
    moved = []
    for first, width in ((0, 128), (100 * 128, 128), (29184 + 40 * 16, 16), (32512 + 7, 1)):
        t = z.clone()
        b = t[first : first + width]
        if width > 1:  # move the bucket's step to its middle (keeping its two values)
            lo, hi = int(b.min()), int(b.max())
            b[: width // 2], b[width // 2 :] = lo, max(hi, lo + 1)
        else:  # R3 is looked up directly: any byte
            b[0] = 200
        assert _vbmi_shaped(t) and not torch.equal(t, z)
        moved.append(t)
    g = torch.Generator().manual_seed(4)
    mu = torch.randint(-(2**15), 2**15, (300_000,), dtype=torch.int16, generator=g)
    sg = torch.randint(0, 2**15, (300_000,), dtype=torch.int16, generator=g)
    for t in [*moved, z]:
        args = (mu, sg, t, 99, noise.MU16_SHIFT, noise.SHIFT16)
        ref = torch.ops.qbdl.sample_plain_kernel(*args, "scalar")
        assert torch.equal(torch.ops.qbdl.sample_plain_kernel(*args, "avx512vbmi"), ref)
        assert torch.equal(torch.ops.qbdl.sample_plain(*args), ref)


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
        ref = torch.ops.qbdl.sample_plain_kernel(
            sampler.mu, sampler.sg, noise.z_table(), noise.to_int64(k), *SHIFTS, "scalar"
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


def test_machine_info_names_the_sampling_kernel_in_use():
    # bench.json and results.json carry machine_info(): a speed figure must say which kernel produced it
    from qbdl.machine import machine_info

    assert machine_info()["sample_kernel"] == torch.ops.qbdl.sample_isa() == native.sample_kernel()
