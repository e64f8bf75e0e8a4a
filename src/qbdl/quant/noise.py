"""Cheap integer weight sampling: int8 w = round(mu/S + (sigma/S) * z) with z from a fixed Gaussian pool.

Why: drawing FP32 Gaussians for every weight on every forward costs ~300 ms for ResNet-50 here, more
than ten INT8 forwards. Instead each layer owns a pool of N(0,1) values (clamped at +-4, fixed point
1/64), drawn once from the model seed and the layer's index (its own stream: layers of equal size do
not share noise). The pool holds `slots` back-to-back windows of the layer's size; a forward reads one
whole window (a view: no copy) and a random global sign. The arithmetic is int32 fixed point:
sigma in 2^-12 units of the sampled-weight scale S, so the product needs one multiply, one add,
one shift, one clamp per weight (~12 ms for ResNet-50's 23.5 M weights on 2 cores).

Statistical property kept: for every weight, the noise is marginally N(0, sigma^2) (up to the +-4 sigma
clamp, variance loss 0.012%, and the 1/64 grid), independent of its mean; the int8 rounding adds its
usual ~S^2/12. Weights of one forward see consecutive pool values (iid). MC sample s (mc_predict sets
the index) reads window s mod slots: windows never overlap, so `slots` successive samples are independent;
sample s + slots re-reads window s with a fresh random sign (uncorrelated with it, not independent).
A forward without an MC index reads a random window (two such forwards share one with probability 1/slots). Memory: 2 * slots bytes per weight (slots=16: 752 MB for ResNet-50's 23.5 M
weights, 8.6 MB for ResNet-20's 0.27 M), allocated on a layer's first sampled forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

NOISE_SLOTS = 16  # default windows per layer: successive MC samples that never share noise
Z_BITS = 6  # pool values are round(z * 2^6), int16
SIG_BITS = 12  # sigma / S in fixed point 2^-12
SHIFT = Z_BITS + SIG_BITS
CLAMP_Z = 4.0
# In-place kernel (inplace.py), 7 bytes read per weight: mu/S and sigma/S as int16, mu in 2^-8, sigma in 2^-9
# of the int8 step (|mu/S| <= 127, sigma/S <= 127/3 by construction of S: both fit, products fit in int32).
MU16_BITS, SIG16_BITS = 8, 9
SHIFT16 = Z_BITS + SIG16_BITS
MU16_SHIFT = SHIFT16 - MU16_BITS
SAMPLE_HEADROOM = 3.0  # S = max(|mu| + 3 sigma) / 127 per output channel: clipping is rare


def noise_pool(seed: int, stream: int, n: int, slots: int = NOISE_SLOTS) -> Tensor:
    """The int16 pool of layer `stream` under model `seed`: `slots` windows of `n` values, back to back."""
    if slots < 1 or n < 1:
        raise ValueError(f"noise pool needs slots >= 1 and n >= 1, got slots={slots}, n={n}")
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 104_729 * (int(stream) + 1)) % (2**63 - 1))
    pool = torch.empty(slots * n, dtype=torch.int16)
    for k in range(slots):  # one window at a time: no float32 copy of the whole pool
        z = torch.randn(n, generator=gen).clamp_(-CLAMP_Z, CLAMP_Z)
        pool[k * n : (k + 1) * n] = z.mul_(2**Z_BITS).round_().to(torch.int16)
    return pool


def window_offset(slot: int, n: int, slots: int) -> int:
    """Start of window `slot` (taken mod `slots`) in a pool of windows of `n` values."""
    return (int(slot) % int(slots)) * int(n)


def sample_scale(mu: Tensor, sigma: Tensor) -> Tensor:
    """Per-output-channel symmetric scale of sampled weights: max(|mu| + 3 sigma) / 127."""
    return ((mu.abs() + SAMPLE_HEADROOM * sigma).flatten(1).amax(1) / 127).clamp_min(1e-12)


def fixed_point(mu: Tensor, sigma: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int32 (mu/S * 2^SHIFT + half, sigma/S * 2^SIG_BITS): the cached operands of `sample_int8`."""
    s = scale.view(-1, *[1] * (mu.dim() - 1)).double()
    mu32 = (mu.double() / s * 2**SHIFT).round() + 2 ** (SHIFT - 1)  # + half: the shift then rounds
    sg32 = (sigma.double() / s * 2**SIG_BITS).round()
    return mu32.to(torch.int32).contiguous(), sg32.to(torch.int32).contiguous()


def fixed_point16(mu: Tensor, sigma: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """int16 (mu/S * 2^MU16_BITS, sigma/S * 2^SIG16_BITS): the operands of the in-place kernel."""
    s = scale.view(-1, *[1] * (mu.dim() - 1)).double()
    mu16 = (mu.double() / s * 2**MU16_BITS).round().clamp(-(2**15), 2**15 - 1)
    sg16 = (sigma.double() / s * 2**SIG16_BITS).round().clamp(0, 2**15 - 1)
    return mu16.to(torch.int16).contiguous(), sg16.to(torch.int16).contiguous()


def sample_int8(mu32: Tensor, sg32: Tensor, pool: Tensor, offset: int, negate: bool) -> Tensor:
    """One int8 weight sample round(mu/S +- sigma/S * z[offset:offset+n]), clamped to [-127, 127]."""
    z = pool[offset : offset + mu32.numel()].view(mu32.shape)
    x = torch.mul(sg32, z)  # int32; |x| < 2^26 by construction of S
    if negate:
        torch.sub(mu32, x, out=x)
    else:
        x.add_(mu32)
    x.bitwise_right_shift_(SHIFT).clamp_(-127, 127)
    return x.to(torch.int8)


def draw_sign(generator: torch.Generator | None = None) -> bool:
    """A random global sign of one sample from `generator` (None: the global torch generator, so seeds reproduce)."""
    return bool(torch.randint(0, 2, (1,), generator=generator))
