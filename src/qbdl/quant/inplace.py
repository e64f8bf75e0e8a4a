"""Fresh INT8 weight samples written straight into oneDNN-packed weights: no re-packing per forward.

Why: re-packing ResNet-50's sampled weights through the public prepack ops costs ~70 ms per forward here,
more than a third of a batch-32 INT8 forward; writing them in place costs 8 ms. Packing is a fixed
permutation (plus zero padding and an int32 per-channel compensation), and the weight noise is iid, so
it can be generated in packed order directly: data[p] = round(mu[src(p)]/S + sigma[src(p)]/S * z(key, p))
has the same distribution as sampling in the original order and packing (noise.py: z is a hash of the key
and the packed position p, so this path and the re-packing one give different samples of one law). The permutation is not read from oneDNN's internal format description: it is
*measured* by packing weights whose bytes encode their own index, then checked on a random weight (data
and compensation); a layout that does not check out is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import noise

_BASE = 254  # int8 values except 0 (0 marks padding)


@dataclass(frozen=True)
class PackedLayout:
    """Where each packed byte comes from: src[p] = flat weight index or -1 (padding); n_comp int32 after.

    Output channel c's sum is int32 number comp_slot[c] of those: not always c, since oneDNN may pad each group
    of a grouped conv to its own block (with AMX: 8 channels per group padded to 16).
    """

    src: Tensor  # int64 [data_bytes]
    n_comp: int
    comp_slot: Tensor  # int64 [output channels]; empty when n_comp == 0

    @property
    def data_bytes(self) -> int:
        """Bytes of weight data (and padding) before the compensation."""
        return self.src.numel()


def _encode(idx: Tensor, digit: int) -> Tensor:
    d = (idx // _BASE**digit) % _BASE  # 0..253
    v = d - 127  # -127..126
    return torch.where(v >= 0, v + 1, v).to(torch.int8)  # -127..-1, 1..127: never 0


def _decode(v: Tensor, digit: int) -> Tensor:
    v = v.long()
    return (torch.where(v > 0, v - 1, v) + 127) * _BASE**digit


def _digits(count: int) -> int:
    """Base-254 digits needed to tell `count` indices apart."""
    return max(1, math.ceil(math.log(max(count, 2), _BASE)))


def _positions(probes: list[Tensor], count: int) -> Tensor | None:
    """The index each position holds (-1: padding) from its `_encode`d digits, one int8 probe per digit.

    None unless every probe pads the same positions and the others hold 0..count-1 once each.
    """
    pad = probes[0] == 0
    if any(not torch.equal(p == 0, pad) for p in probes[1:]) or int((~pad).sum()) != count:
        return None
    src = sum(_decode(p, d) for d, p in enumerate(probes))
    src[pad] = -1
    return src if torch.equal(src[~pad].sort().values, torch.arange(count)) else None


def inverse(src: Tensor, count: int) -> Tensor:
    """The position of each index 0..count-1 in `src` (a `_positions` result): src[inverse(src)[i]] == i."""
    keep = src >= 0
    where = torch.empty(count, dtype=torch.long)
    where[src[keep]] = torch.nonzero(keep).flatten()
    return where


def _comp_slots(
    pack: Callable[[Tensor], Tensor], shape: tuple[int, ...], data: int, n_comp: int
) -> Tensor | None:
    """Which of the n_comp int32 after `data` bytes holds each output channel's sum (None: not one each)."""
    oc, row = shape[0], math.prod(shape[1:])
    probes = []
    for d in range(_digits(oc)):
        w = torch.zeros(oc, row, dtype=torch.int8)
        w[:, 0] = _encode(torch.arange(oc), d)  # each channel's sum is its index's digit d, never 0
        comp = torch.ops.qbdl.packed_bytes(pack(w.view(shape)))[data:].view(torch.int32)
        if comp.numel() != n_comp or bool((comp.abs() > 127).any()):
            return None
        probes.append((-comp).to(torch.int8))  # the sums are minus the digits
    src = _positions(probes, oc)
    return None if src is None else inverse(src, oc)


def discover_layout(pack: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> PackedLayout | None:
    """Measure how `pack` (int8 weight of `shape`, output channel first -> oneDNN packed tensor) lays out bytes.

    None when the packed bytes are not (permuted weights + zero padding, then -rowsum int32 per padded
    output channel, or nothing): the caller then re-packs instead.
    """
    n, oc = math.prod(shape), shape[0]
    idx = torch.arange(n)
    probes = [
        torch.ops.qbdl.packed_bytes(pack(_encode(idx, d).view(shape))).view(torch.int8)
        for d in range(_digits(n))
    ]
    total = probes[0].numel()
    candidates = sorted({0} | {-(-oc // b) * b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)})
    for ocp in candidates:
        data = total - 4 * ocp
        if data < n or data % 4:
            continue
        src = _positions([p[:data] for p in probes], n)
        if src is None:
            continue
        slot = _comp_slots(pack, shape, data, ocp) if ocp else torch.empty(0, dtype=torch.long)
        if slot is None:
            continue
        layout = PackedLayout(src, ocp, slot)
        w = torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(n))
        if torch.equal(torch.ops.qbdl.packed_bytes(pack(w)), expected_bytes(layout, w)):
            return layout
    return None


def expected_bytes(layout: PackedLayout, w: Tensor) -> Tensor:
    """The packed bytes `layout` predicts for int8 weight `w` (data, then minus each channel's sum)."""
    flat = w.reshape(-1)
    data = torch.where(layout.src >= 0, flat[layout.src.clamp_min(0)], torch.zeros((), dtype=torch.int8))
    comp = torch.zeros(layout.n_comp, dtype=torch.int32)
    if layout.n_comp:  # oneDNN adds no compensation when the input zero point is 0
        comp[layout.comp_slot] = -w.reshape(w.shape[0], -1).sum(1, dtype=torch.int32)
    return torch.cat([data.view(torch.uint8), comp.view(torch.uint8)])


def repeated_blocks(slots: Tensor) -> tuple[Tensor, int, int]:
    """(slots of one repetition, reps, block): `slots` viewed as [G, reps, block] with every repetition equal.

    oneDNN's blocked layouts repeat one block of channels (e.g. 64 channels x 4 input bytes) over the input
    dimension, so the channel sums can be taken blockwise; (slots, 1, 1) when no block size up to 4096 does.
    """
    n = slots.numel()
    for block in (2**k for k in range(4, 13)):
        if n % block or n == block:
            continue
        rows = slots.view(-1, block)
        new = torch.ones(rows.shape[0], dtype=torch.bool)
        new[1:] = (rows[1:] != rows[:-1]).any(1)
        starts = torch.nonzero(new).flatten()
        reps = int(starts[1]) if starts.numel() > 1 else rows.shape[0]
        if reps > 1 and rows.shape[0] % reps == 0:
            grouped = rows.view(-1, reps, block)
            if torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
                return grouped[:, 0].reshape(-1).contiguous(), reps, block
    return slots.contiguous(), 1, 1


class PackedSampler:
    """A oneDNN-packed int8 weight overwritten in place with a fresh sample (counter noise, see noise.py).

    Keeps 4 bytes a weight beside the packed weight (int16 mu/S and sigma/S in packed order), plus the int16
    channel slot of each byte (of one block, where blocks repeat: `repeated_blocks`) only where oneDNN stores
    channel sums (an input zero point != 0: few layers, e.g. the first conv and the classifier). The layout
    itself (8 bytes a weight) is dropped once these are built.
    """

    def __init__(
        self, pack: Callable[[Tensor], Tensor], layout: PackedLayout, mu16: Tensor, sg16: Tensor
    ) -> None:
        src = layout.src
        pad = src < 0
        s = src.clamp_min(0)
        self.pack = pack
        self.packed = pack(torch.zeros(mu16.shape, dtype=torch.int8))
        self.n_comp = layout.n_comp
        zero = torch.zeros((), dtype=torch.int16)
        self.mu = torch.where(pad, zero, mu16.reshape(-1)[s]).contiguous()
        self.sg = torch.where(pad, zero, sg16.reshape(-1)[s]).contiguous()
        self.oc = torch.empty(0, dtype=torch.int16)
        self.reps, self.block = 1, 1
        if layout.n_comp:  # the C++ loop adds each byte to the sum at its channel's slot
            channel = s // mu16[0].numel()
            if int(layout.comp_slot.max()) >= layout.n_comp:
                raise ValueError(
                    f"packed layout has {layout.n_comp} channel sums for {mu16.shape[0]} channels"
                )
            self.oc, self.reps, self.block = repeated_blocks(layout.comp_slot[channel].to(torch.int16))
        self._order: tuple[int, Tensor] | None = None  # unpacked()'s gather

    def sample(self, key: int, negate: bool = False) -> Tensor:
        """Write the sample of counter key `key` (noise.key) into the packed weight; returns it.

        `negate` is part of QuantLayer._draw's tuple and always False for counter noise (a new key is new noise).
        """
        if negate:
            raise ValueError("the in-place sampler draws counter noise: a negated sample is never asked for")
        torch.ops.qbdl.sample_packed(
            self.packed, self.mu, self.sg, self.oc, self.n_comp, self.reps, self.block, noise.z_table(),
            noise.to_int64(key),
            noise.MU16_SHIFT, noise.SHIFT16,
        )  # fmt: skip
        return self.packed

    def _measured_order(self, shape: tuple[int, ...]) -> tuple[int, Tensor]:
        """(data bytes, packed position of each weight): kept from unpacked(), else measured again, not kept."""
        if self._order is not None:
            return self._order
        layout = discover_layout(self.pack, shape)
        if layout is None:  # it checked out when this sampler was built, and the packing is the same
            raise RuntimeError(f"the packed layout of a {list(shape)} weight no longer checks out")
        return layout.data_bytes, inverse(layout.src, math.prod(shape))

    def unpacked(self, packed: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The int8 weight (original layout) held by `packed`, for tests and qbdl.fidelity.

        The first call measures the layout again and keeps its inverse (8 bytes a weight, paid only here).
        """
        if self._order is None:
            self._order = self._measured_order(shape)
        n, order = self._order
        return torch.ops.qbdl.packed_bytes(packed)[:n].view(torch.int8)[order].view(shape)

    def operands_in_order(self, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """int16 mu/S and sigma/S in the weights' own order (the layout's inverse is not kept)."""
        order = self._measured_order(shape)[1]
        return self.mu[order].view(shape), self.sg[order].view(shape)
