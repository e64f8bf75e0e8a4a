"""What one forward of a QuantLayer computes with: one small sampler object per sampler, and the mean.

The layer (layers.py) holds the int8 tensors, the qparams, the packing and the kernels; its sampler picks the
weights of each forward ('fresh', 'bank'), or runs the forward itself ('flipout': two kernels per layer). A
sampler draws from the global generator in a fixed order (the MC index decides the pool window or bank entry
where one is set), so a seed reproduces every output. Samplers hold only derived state: packed oneDNN
weights are dropped on copy or pickle (oneDNN cannot copy them), and a copy packs its own on first use.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import inplace, native, noise
from .activations import clamp_qmax

if TYPE_CHECKING:
    from .layers import QuantLayer

# what Sampler.weights returns: (packed weight, weight scales, float bias, int8 weight or None)
Weights = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


class Sampler:
    """One layer's way of choosing its weights; `forward` runs the layer's kernel with them."""

    name = ""
    _unpicklable: tuple[str, ...] = ()  # attributes that hold packed weights or pending work

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in self._unpicklable:
            state[k] = None
        return state

    def weights(self, q: QuantLayer) -> Weights:
        """(packed weight, its scales, float bias, the int8 weight when q.trace is on) for this forward."""
        raise NotImplementedError

    def forward(self, q: QuantLayer, x: Tensor) -> Tensor:
        """The layer's output on uint8 `x` with this forward's weights."""
        packed, ws, bias, w = self.weights(q)
        return q.run(x, packed, ws, bias, w)

    def prefetch(self, q: QuantLayer, executor: ThreadPoolExecutor) -> None:
        """Draw this forward's random numbers now, in the model's layer order (only 'fresh' needs to)."""


class MeanSampler(Sampler):
    """Deterministic layers, and Bayesian ones in mode 'mean': int8 mu, packed once."""

    name = "mean"
    _unpicklable = ("packed",)

    def __init__(self) -> None:
        self.packed: tuple[Tensor, Tensor | None, Tensor] | None = None

    def weights(self, q: QuantLayer) -> Weights:
        if self.packed is None:
            bias = None if q.bias_q is None else q.bias_q.float() * q._bias_scale
            self.packed = (q._prepack(q.mu_q, q.mu_scale, q.in_scale, q.in_zp), bias, q.mu_scale.float())
        packed, bias, ws = self.packed
        return packed, ws, bias, q.mu_q


class FreshSampler(Sampler):
    """'fresh': a new int8 weight every forward (pool noise, noise.py).

    Written into the oneDNN-packed weight in place (inplace.py) where the layer can, else sampled and re-packed
    (in a worker thread when the model's prefetch hook runs: packing dominates at small batch).
    """

    name = "fresh"
    _unpicklable = ("inplace", "pending", "pending_draws")

    def __init__(self) -> None:
        self.inplace: inplace.PackedSampler | None = None  # built on the first sampled forward
        self.pending: Future | None = None  # re-pack job of the prefetch hook
        self.pending_draws: tuple | None = None  # the prefetch hook's draws for the in-place kernel

    def prefetch(self, q: QuantLayer, executor: ThreadPoolExecutor) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if q.inplace_capable:  # sampled into its packed weight right before its kernel: nothing to prefetch
            self.pending_draws = q._draw(None)
        else:
            self.pending = executor.submit(self._repack, q, q._draw(None))

    @staticmethod
    def _repack(q: QuantLayer, draws: tuple) -> tuple[Tensor, Tensor | None, Tensor]:
        w, bias = q._make(*draws)
        return q._prepack(w, q._w_scale, q.in_scale, q.in_zp), bias, w

    def packed_sampler(self, q: QuantLayer) -> inplace.PackedSampler | None:
        """The in-place sampler, built on the first sampled forward (it packs for the input's shape)."""
        if self.inplace is None and q.inplace_capable:
            shape, ws = tuple(q.mu_q.shape), q._w_scale

            def pack(w: Tensor) -> Tensor:
                return q._prepack(w, ws, q.in_scale, q.in_zp)

            layout = inplace.discover_layout(pack, shape)
            if layout is None:  # this layer's packed format is not a plain permutation here
                q.fresh_kernel = "prepack"
                warnings.warn(
                    f"INT8 layer {q.index} ({q.kind} {shape}): oneDNN's packed weight layout on this CPU did not "
                    "check out, so its fresh samples are re-packed every forward (the same samples, slower); "
                    "please report the CPU and layer shape.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return None
            mu16, sg16 = noise.fixed_point16(q._deq(q.mu_q, q.mu_scale), q._deq(q.sigma_q, q.sigma_scale), ws)
            pool = noise.noise_pool(q.seed, q.index, layout.data_bytes, q.noise_slots)
            self.inplace = inplace.PackedSampler(pack, layout, mu16, sg16, pool, q.noise_slots)
        return self.inplace

    def weights(self, q: QuantLayer) -> Weights:
        if self.pending_draws is not None or q.inplace_capable:
            draws, self.pending_draws = self.pending_draws, None
            draws = q._draw(None) if draws is None else draws
            sampler = self.packed_sampler(q)
            if sampler is not None:
                packed, bias = sampler.sample(draws[0], draws[1]), q._bias(draws[2])
                w = sampler.unpacked(packed, tuple(q.mu_q.shape)) if q.trace is not None else None
                return packed, q._w_scale, bias, w
            packed, bias, w = self._repack(q, draws)  # layout check failed: the same draws, re-packed
        elif self.pending is not None:  # prefetched by the model's pre-hook (same draws, same order)
            (packed, bias, w), self.pending = self.pending.result(), None
        else:
            packed, bias, w = self._repack(q, q._draw(None))
        return packed, q._w_scale, bias, w


def _entry(q: QuantLayer) -> int:
    """The bank entry of this forward: the MC index mod K, else a random one (global generator)."""
    i = q._mc_index
    return int(torch.randint(0, q.bank_size, (1,))) if i is None else i % q.bank_size


class BankSampler(Sampler):
    """'bank': K samples drawn from the layer's seed, quantized and packed once; MC sample s uses entry s mod K."""

    name = "bank"
    _unpicklable = ("packed",)

    def __init__(self, q: QuantLayer) -> None:
        gen = q._bank_generator()
        self.draws = [q._draw(gen, k) for k in range(q.bank_size)]
        self.packed: dict[int, tuple[Tensor, Tensor | None]] | None = None

    def weight(self, q: QuantLayer, i: int) -> tuple[Tensor, Tensor | None]:
        """Entry i's int8 weight and float bias."""
        return q._make(*self.draws[i % q.bank_size])

    def weights(self, q: QuantLayer) -> Weights:
        i = _entry(q)
        if self.packed is None:  # the whole bank at once, for the first input's shape
            self.packed = {}
            for k in range(q.bank_size):
                w, bias = self.weight(q, k)
                self.packed[k] = (q._prepack(w, q._w_scale, q.in_scale, q.in_zp), bias)
        packed, bias = self.packed[i]
        return packed, q._w_scale, bias, self.weight(q, i)[0] if q.trace is not None else None


def _check_flipout(q: QuantLayer) -> None:
    if "pert_scale" not in q.config:
        raise ValueError(
            "sampler='flipout' needs the calibrated ranges of INT8 Flipout's two terms: quantize with "
            "quantize_bnn(..., sampler='flipout') or prepare(..., per_example=True) + calibrate + convert"
        )
    if not (q.kind in ("conv2d", "linear") and native.available()):
        raise ValueError(
            f"sampler='flipout' needs conv2d/linear layers (got {q.kind}) and qbdl's C++ ops "
            f"(available: {native.available()}); use 'fresh' or 'bank' otherwise"
        )


class FlipoutSampler(Sampler):
    """'flipout': y = conv(x, mu) + s_out * conv(x * s_in, delta_k), per-example, per-channel signs (Wen et al.

    2018) over K banked int8 perturbations delta_k; two oneDNN kernels and two C++ elementwise passes.
    """

    name = "flipout"
    _unpicklable = ("packed",)

    def __init__(self, q: QuantLayer) -> None:
        _check_flipout(q)
        gen = q._bank_generator()
        sigma = q._deq(q.sigma_q, q.sigma_scale)
        # fixed per-channel scale: 4 sigma_max covers all but ~6e-5 of the N(0,1) draws
        self.w_scale = (4 * sigma.flatten(1).amax(1) / 127).clamp_min(1e-12)
        s = self.w_scale.view(-1, *[1] * (sigma.dim() - 1))
        self.pert_q = [
            torch.round(sigma * torch.randn(sigma.shape, generator=gen) / s).clamp_(-127, 127).to(torch.int8)
            for _ in range(q.bank_size)
        ]
        self.packed: tuple[Tensor, list[Tensor]] | None = None

    @staticmethod
    def flip_zp(q: QuantLayer) -> int:
        """Zero point of the sign-flipped input (uint8, twice the input scale)."""
        return (q.qmax + 1) // 2

    def _packed(self, q: QuantLayer) -> tuple[Tensor, list[Tensor]]:
        """(packed int8 mu, packed perturbations), packed on the first sampled forward."""
        if self.packed is None:
            mu = q._prepack(q.mu_q, q.mu_scale, q.in_scale, q.in_zp)
            zp = self.flip_zp(q)
            self.packed = (mu, [q._prepack(w, self.w_scale, 2 * q.in_scale, zp) for w in self.pert_q])
        return self.packed

    def forward(self, q: QuantLayer, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        mu, pert = self._packed(q)
        k = _entry(q)
        batch, c_out = x.shape[0], q.mu_q.shape[0]
        s_in = torch.randint(0, 2, (batch, x.shape[1]), dtype=torch.int8).mul_(2).sub_(1)
        s_out = torch.randint(0, 2, (batch, c_out), dtype=torch.int8).mul_(2).sub_(1)
        _, _, eps_b = q._draw(None)
        c, xs, xz, fz = q.config, q.in_scale, q.in_zp, self.flip_zp(q)
        bias = q._bias(None)
        # bias noise goes into the sign-flipped term, as in FP32 Flipout: one draw per example
        bias_noise = None if eps_b is None else q.bias_sigma_q.float() * eps_b * q._bias_scale
        y1 = q._onednn(x, xs, xz, mu, q.mu_scale.float(), bias, c["mean_scale"], c["mean_zp"])
        q._record(x, xs, xz, q.mu_q, q.mu_scale, bias, y1, c["mean_scale"], c["mean_zp"], False, 255)
        # x * s_in needs signs: uint8 with zero point (qmax+1)/2 at twice the scale (one bit of the input lost;
        # reduced range: 0..128 at most, whose int16 pair sums 2 * 128 * 127 still fit)
        xf = torch.ops.qbdl.flip_requant(x, s_in, xz, 0.5, fz)
        y2 = q._onednn(xf, 2 * xs, fz, pert[k], self.w_scale, bias_noise, c["pert_scale"], 128)
        q._record(
            xf, 2 * xs, fz, self.pert_q[k], self.w_scale, bias_noise, y2, c["pert_scale"], 128, False, 255
        )
        out = torch.ops.qbdl.signed_add(
            y1, c["mean_scale"], c["mean_zp"], y2, c["pert_scale"], 128, s_out, q.out_scale, q.out_zp, q.relu,
        )  # fmt: skip
        return clamp_qmax(out, q.qmax)


def make(q: QuantLayer) -> Sampler:
    """The sampler object of layer `q` (by q.sampler); built from the layer's int8 tensors and seed."""
    if q.sampler == "bank":
        return BankSampler(q)
    if q.sampler == "flipout":
        return FlipoutSampler(q)
    return FreshSampler()
