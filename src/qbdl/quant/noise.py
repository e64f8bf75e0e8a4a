"""Integer weight sampling: int8 w = round(mu/S + (sigma/S) * z), z generated from a counter, never stored.

Why: drawing FP32 Gaussians for every weight on every forward costs ~300 ms for ResNet-50, more than ten INT8
forwards, and storing pre-drawn noise costs memory (the int16 pools of earlier versions: 16 windows, 2 bytes
per weight and window, 752 MB for ResNet-50, more than the FP32 BNN). Here each weight's z is a pure function
of (model seed, layer index, MC counter, weight position):

  key   = splitmix64(seed, layer, counter)            (64 bits, on the host, once per layer and forward)
  h     = lowbias32(lowbias32(position + key_lo) ^ key_hi)   (32 bits, per weight, in the kernel)
  |z|   = Z_TABLE[h >> 17] / 64,  sign = bit 16 of h  (inverse CDF of |N(0,1)| at the 2^15 mid-quantiles)

lowbias32 (C. Wellons' 2-multiply integer hash, a bijection of 32 bits) is applied twice with the key mixed in
between, so a new counter changes every weight's hash input in ~16 bits (no shifted copies of one stream).
The table inverts the half-normal CDF at u = (j + 1/2) / 2^15 and rounds to the 1/64 grid, |z| <= 255/64:
z takes each grid value with its N(0,1) probability up to 2^-16 (the resolution of 16 uniform bits), the
largest |z| is 3.98 (P(|Z| > 3.98) = 7e-5; variance lost 0.05%). Every MC index gets its own counter, so
samples never repeat (no cycle of windows); a forward without an MC index takes a 62-bit counter from the
global torch generator, so torch.manual_seed reproduces it. Memory: a 32 KiB table, shared.

The arithmetic is int32 fixed point on two int16 operands per weight, computed once from the int8 tensors:
  mu16 = round(mu/S * 2^8), sg16 = round(sigma/S * 2^9)    (S: the sample scale of the weight's channel)
  v = (mu16 * 2^7 + sg16 * z64 + 2^14) >> 15,  clamp to [-127, 127]
(|mu/S| <= 127 and sigma/S <= 127/3 by construction of S: both fit int16, the sum fits int32). The in-place
kernel keeps them in packed order, so its loop is a stream with one table lookup per weight and no per-channel
gather (measured: per-channel multipliers read per weight ran 3-5x slower on AVX2).
The C++ kernel (csrc/inplace.cpp) and `sample_reference` below compute the same integers.

Files written before the counter noise ("noise": "pool", noise_slots): their bank samplers still read the
same pool windows (`legacy_window`), generated one window at a time and dropped once the bank is packed.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

GENERATORS = ("counter", "pool")  # counter: this module; pool: banks of files written before it (noise_slots)
Z_BITS = 6  # z on the grid 1/64
TABLE_BITS = 15  # 2^15 quantiles of |z|, plus a sign bit: 16 uniform bits per weight
SAMPLE_HEADROOM = 3.0  # S = max(|mu| + 3 sigma) / 127 per output channel: clipping is rare
_M64 = (1 << 64) - 1
# legacy pool noise (format <= 3 bank files)
NOISE_SLOTS = 16
CLAMP_Z = 4.0
SIG_BITS = 12
SHIFT = Z_BITS + SIG_BITS


@functools.cache
def z_table() -> Tensor:
    """uint8 [2^15]: round(64 * |z|) at the mid-quantiles of the half-normal law, capped at 255."""
    u = (torch.arange(1 << TABLE_BITS, dtype=torch.float64) + 0.5) / (1 << TABLE_BITS)
    z = torch.special.ndtri((1 + u) / 2)  # P(|Z| <= z) = u
    return (z * 2**Z_BITS).round().clamp(0, 255).to(torch.uint8).contiguous()


def grid_probabilities() -> Tensor:
    """float64 [511]: P(z = k / 64) for k = -255..255 under this generator (exact: counts of table entries)."""
    counts = torch.bincount(z_table().long(), minlength=256).double() / (1 << (TABLE_BITS + 1))
    p = torch.cat([counts.flip(0)[:-1], counts[:1] * 2, counts[1:]])
    return p


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def key(seed: int, layer: int, counter: int, random: bool = False) -> int:
    """64-bit key of one layer's sample: MC index `counter`, or (random=True) a counter from the global generator."""
    k = _splitmix64(int(seed) & _M64)
    k = _splitmix64(k ^ (int(layer) & _M64))
    k = _splitmix64(k ^ (int(counter) & _M64) ^ (0x5A5A5A5A00000000 if random else 0))
    return k


def random_counter(generator: torch.Generator | None = None) -> int:
    """A 62-bit counter from `generator` (None: the global torch generator, so seeds reproduce)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), in 16-bit halves so no int64 product overflows."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & 0xFFFFFFFF


def _lowbias32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32(k: int, positions: Tensor) -> Tensor:
    """The 32-bit hash of each position under key `k` (int64 values in [0, 2^32)); the C++ kernel's `hash32`."""
    k_lo, k_hi = k & 0xFFFFFFFF, (k >> 32) & 0xFFFFFFFF
    h = _lowbias32((positions.long() + k_lo) & 0xFFFFFFFF)
    return _lowbias32(h ^ k_hi)


def z_grid(k: int, n: int, start: int = 0) -> Tensor:
    """int16 round(64 z) of positions start..start+n-1 under key `k` (torch reference of the kernel's noise)."""
    h = hash32(k, torch.arange(start, start + n, dtype=torch.int64))
    z = z_table()[(h >> 17)].to(torch.int16)
    return torch.where(((h >> 16) & 1).bool(), -z, z)


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Per-output-channel int8 -> float: q * scale (scale broadcast over dimension 0)."""
    return q.float() * scale.view(-1, *[1] * (q.dim() - 1))


def sample_scale(mu: Tensor, sigma: Tensor) -> Tensor:
    """Per-output-channel symmetric scale of sampled weights: max(|mu| + 3 sigma) / 127."""
    return ((mu.abs() + SAMPLE_HEADROOM * sigma).flatten(1).amax(1) / 127).clamp_min(1e-12)


MU16_BITS, SIG16_BITS = 8, 9
SHIFT16 = Z_BITS + SIG16_BITS
MU16_SHIFT = SHIFT16 - MU16_BITS


def operands(mu: Tensor, sigma: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int16 (mu/S * 2^8, sigma/S * 2^9) in the weights' order: the operands of every sampling kernel."""
    s = scale.view(-1, *[1] * (mu.dim() - 1)).double()
    mu16 = (mu.double() / s * 2**MU16_BITS).round().clamp(-(2**15), 2**15 - 1)
    sg16 = (sigma.double() / s * 2**SIG16_BITS).round().clamp(0, 2**15 - 1)
    return mu16.to(torch.int16).contiguous(), sg16.to(torch.int16).contiguous()


def operand_factors(mu_scale: Tensor, sigma_scale: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel float64 factors f with operands(dequantize(q, q_scale), ...) = round(q * f) (mu, sigma)."""
    s = scale.double()
    return mu_scale.double() / s * 2**MU16_BITS, sigma_scale.double() / s * 2**SIG16_BITS


def from_operand(op16: Tensor, factor: Tensor) -> Tensor:
    """The int8 tensor an int16 operand came from, given its operand_factors factor (exact where factor > ~2)."""
    f = factor.view(-1, *[1] * (op16.dim() - 1))
    return (op16.double() / f).round().clamp(-127, 127).to(torch.int8)


def sample_reference(mu16: Tensor, sg16: Tensor, k: int) -> Tensor:
    """int8 sample of weights in their original order under key `k`: the integers of the C++ `sample_plain`."""
    z = z_grid(k, mu16.numel()).view(mu16.shape).int()
    v = mu16.int() * (1 << MU16_SHIFT) + sg16.int() * z + (1 << (SHIFT16 - 1))
    return (v >> SHIFT16).clamp_(-127, 127).to(torch.int8)


def sample_int8(mu16: Tensor, sg16: Tensor, k: int) -> Tensor:
    """One int8 weight sample (original order) under key `k`: the C++ op where built, else the reference."""
    from . import native

    if native.available():
        return torch.ops.qbdl.sample_plain(mu16, sg16, z_table(), to_int64(k), MU16_SHIFT, SHIFT16)
    return sample_reference(mu16, sg16, k)


def to_int64(k: int) -> int:
    """A 64-bit key as the signed int64 a torch op takes (same bits)."""
    return k - 2**64 if k >= 2**63 else k


# -- legacy: the int16 pool noise of files written before the counter noise (bank samplers only)


def legacy_window(seed: int, stream: int, n: int, slot: int) -> Tensor:
    """Window `slot` of the old int16 pool of layer `stream` (windows drawn in order; earlier ones dropped)."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 104_729 * (int(stream) + 1)) % (2**63 - 1))
    for _ in range(slot):
        torch.randn(n, generator=gen)
    z = torch.randn(n, generator=gen).clamp_(-CLAMP_Z, CLAMP_Z)
    return z.mul_(2**Z_BITS).round_().to(torch.int16)


def legacy_sample(mu: Tensor, sigma: Tensor, scale: Tensor, z: Tensor, negate: bool) -> Tensor:
    """The old fixed-point sample round(mu/S +- sigma/S * z) of pool window `z` (bit for bit)."""
    s = scale.view(-1, *[1] * (mu.dim() - 1)).double()
    mu32 = ((mu.double() / s * 2**SHIFT).round() + 2 ** (SHIFT - 1)).to(torch.int32)
    sg32 = (sigma.double() / s * 2**SIG_BITS).round().to(torch.int32)
    x = torch.mul(sg32, z.view(mu.shape))
    x = torch.sub(mu32, x) if negate else x.add_(mu32)
    return x.bitwise_right_shift_(SHIFT).clamp_(-127, 127).to(torch.int8)


def draw_sign(generator: torch.Generator | None = None) -> bool:
    """A random global sign of one legacy pool sample."""
    return bool(torch.randint(0, 2, (1,), generator=generator))


def upgrade_config(config: dict) -> str | None:
    """Bring a QuantLayer config of an older file to this version's meaning, in place; a warning or None.

    Configs written before the counter noise carry "noise_slots" (their int16 pools' windows); newer ones do
    not. A bank keeps it and the pool noise it was saved with (same samples, bit for bit: only its K windows
    are drawn, then dropped); fresh and flipout layers lose it and move to the counter noise, so their MC
    samples (and outputs under a seed) change, with the same law. io.load_qbnn may call this before
    validating a file; QuantLayer calls it on every config.
    """
    if "noise_slots" not in config:
        return None
    if config.get("sampler", config.get("sampling", "fresh")) == "bank":
        return None
    del config["noise_slots"]
    return (
        "this model file predates qbdl's counter-based INT8 noise: its fresh/flipout layers now generate their "
        "weight noise from a counter instead of the stored pool, so MC samples (and outputs under a seed) change; "
        "the distribution is the same. Save it again to silence this."
    )


def generator(config: dict) -> str:
    """The noise generator a QuantLayer config implies: 'pool' for an older file's bank, else 'counter'."""
    return "pool" if "noise_slots" in config and config.get("sampler", "fresh") == "bank" else "counter"


def max_abs_z() -> float:
    """Largest |z| the generator produces."""
    return float(z_table().max()) / 2**Z_BITS


def table_variance() -> float:
    """Var(z) of the generator (1 for N(0,1)): the grid and the cap at 255/64 lose a little."""
    p = grid_probabilities()
    g = torch.arange(-255, 256, dtype=torch.float64) / 2**Z_BITS
    return float((p * g * g).sum())
