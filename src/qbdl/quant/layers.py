"""The INT8 modules of a QBNN (quantized conv/linear with fresh / bank / flipout sampling, adds, stubs)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from . import inplace, native, noise
from .backend import FULL_QMAX, set_backend

SAMPLINGS = ("fresh", "bank", "flipout")
FRESH_KERNELS = ("auto", "prepack")  # auto: write samples into oneDNN-packed weights where possible


def clamp_qmax(y: Tensor, qmax: int) -> Tensor:
    """Clamp a quint8 activation to 0..qmax in place (reduced range: the next kernel's int16 pairs stay exact)."""
    if qmax >= FULL_QMAX:
        return y
    if native.available():
        torch.ops.qbdl.as_uint8(y).clamp_(max=qmax)  # a view of y's storage: no copy
        return y
    return torch.clamp(y, max=(qmax - y.q_zero_point()) * y.q_scale())


class Quantize(nn.Module):
    """FP32 -> quint8 per tensor with calibrated scale / zero point (values 0..qmax)."""

    def __init__(self, scale: float, zero_point: int, qmax: int = FULL_QMAX) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmax = float(scale), int(zero_point), int(qmax)

    def forward(self, x: Tensor) -> Tensor:
        q = torch.quantize_per_tensor(x.float(), self.scale, self.zero_point, torch.quint8)
        return clamp_qmax(q, self.qmax)

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {"scale": self.scale, "zero_point": self.zero_point, "qmax": self.qmax}


class DeQuantize(nn.Module):
    """quint8 -> FP32."""

    def forward(self, x: Tensor) -> Tensor:
        return x.dequantize() if x.is_quantized else x

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {}


class QAdd(nn.Module):
    """Quantized residual add (+ReLU) with calibrated output scale / zero point."""

    def __init__(self, relu: bool, scale: float, zero_point: int, qmax: int = FULL_QMAX) -> None:
        super().__init__()
        self.relu, self.scale, self.zero_point = bool(relu), float(scale), int(zero_point)
        self.qmax = int(qmax)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        op = torch.ops.quantized.add_relu if self.relu else torch.ops.quantized.add
        return clamp_qmax(op(a, b, self.scale, self.zero_point), self.qmax)

    def spec(self) -> dict:
        """JSON-able constructor arguments."""
        return {"relu": self.relu, "scale": self.scale, "zero_point": self.zero_point, "qmax": self.qmax}


class QuantLayer(nn.Module):
    """INT8 conv/linear: int8 mu (and sigma for a Bayesian layer) per output channel, int32 bias.

    Deterministic (sigma None): one packed int8 weight. Bayesian: `mode` 'mean' uses int8 mu; 'sample'
    draws per `sampling`: 'fresh' = a new int8 weight every forward (integer pool noise, see noise.py)
    packed on the fly; 'bank' = K samples drawn, quantized and packed once (from `seed`), MC sample s uses
    entry s mod K (set_mc_index), a random entry from the global generator when no index is set.
    Sampled weights use the fixed per-channel scale S = max(|mu| + 3 sigma)/127, so the int32 bias
    (in units of input_scale * S) is exact for every sample.
    """

    def __init__(
        self,
        config: dict,
        mu_q: Tensor,
        mu_scale: Tensor,
        sigma_q: Tensor | None = None,
        sigma_scale: Tensor | None = None,
        bias_q: Tensor | None = None,
        bias_sigma_q: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.kind: str = c["kind"]
        self.relu: bool = c["relu"]
        self.in_scale: float = c["in_scale"]
        self.out_scale, self.out_zp = float(c["out_scale"]), int(c["out_zp"])
        # activations 0..qmax (in and out): 127 where a kernel of this model sums u8*s8 pairs in int16
        self.qmax: int = int(c.get("qmax", FULL_QMAX))
        self.backend: str = c["backend"]
        self.sampling: str = c.get("sampling", "fresh")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}; choose one of {SAMPLINGS}")
        self.bank_size: int = int(c.get("bank_size", 16))
        self.seed: int = int(c.get("seed", 0))
        self.index: int = int(c.get("index", 0))
        self.noise_slots: int = int(c.get("noise_slots", noise.NOISE_SLOTS))
        self.fresh_kernel: str = c.get("fresh_kernel", "auto")
        if self.fresh_kernel not in FRESH_KERNELS:
            raise ValueError(f"unknown fresh_kernel {self.fresh_kernel!r}; choose one of {FRESH_KERNELS}")
        self.register_buffer("mu_q", mu_q.to(torch.int8).contiguous())
        self.register_buffer("mu_scale", mu_scale.float().contiguous())
        self.register_buffer("sigma_q", None if sigma_q is None else sigma_q.to(torch.int8).contiguous())
        self.register_buffer("sigma_scale", None if sigma_scale is None else sigma_scale.float().contiguous())
        self.register_buffer("bias_q", None if bias_q is None else bias_q.to(torch.int32).contiguous())
        self.register_buffer(
            "bias_sigma_q", None if bias_sigma_q is None else bias_sigma_q.to(torch.int32).contiguous()
        )
        if self.bayesian:
            self.mode = c.get("mode", "sample")  # found by qbdl.bayes.sampling()
        self._mc_index: int | None = None
        # a list: every kernel call appends what it computed with (int8 operands, uint8 in/out), for the
        # exactness tests against an integer reference (tests/test_quant_isa.py)
        self.trace: list[dict] | None = None
        self._pending: Future | None = None
        self._pending_draws: tuple | None = None
        self._sampler: inplace.PackedSampler | None = None
        self._mean_packed = None
        self._bank: list = []
        self._fresh: tuple | None = None
        self._build()

    def __getstate__(self) -> dict:
        # oneDNN-packed tensors cannot be copied or pickled; a copy builds its own sampler on first use
        state = self.__dict__.copy()
        state["_sampler"] = state["_pending_draws"] = state["_flip"] = None
        return state

    # -- derived state (never saved: rebuilt from the int8 tensors and the seed)

    @property
    def bayesian(self) -> bool:
        """True when the layer holds a sigma (samples weights)."""
        return self.sigma_q is not None

    def _deq(self, q: Tensor, scale: Tensor) -> Tensor:
        return q.float() * scale.view(-1, *[1] * (q.dim() - 1))

    def weight_scale(self) -> Tensor:
        """Per-channel scale of the weights the int32 bias refers to (S of samples, or mu's scale)."""
        if not self.bayesian:
            return self.mu_scale
        return noise.sample_scale(
            self._deq(self.mu_q, self.mu_scale), self._deq(self.sigma_q, self.sigma_scale)
        )

    def _build(self) -> None:
        set_backend(self.backend)
        self._w_scale = self.weight_scale()
        self._bias_scale = self.in_scale * self._w_scale
        self._zeros = torch.zeros(self.mu_q.shape[0], dtype=torch.long)
        self._w_scale64 = self._w_scale.double()
        self._w_zp = torch.zeros(self.mu_q.shape[0], dtype=torch.int32)  # oneDNN ops: symmetric weights
        self._mean_packed = None
        self._bank, self._fresh, self._sampler, self._flip = [], None, None, None
        self.mean_packed()  # eager: forward never packs on the main thread while workers pack
        if not self.bayesian:
            return
        if self.sampling == "flipout":
            self._check_flipout()
            gen = self._bank_generator()
            sigma = self._deq(self.sigma_q, self.sigma_scale)
            # fixed per-channel scale: 4 sigma_max covers all but ~6e-5 of the N(0,1) draws
            self._pert_w_scale = (4 * sigma.flatten(1).amax(1) / 127).clamp_min(1e-12)
            s = self._pert_w_scale.view(-1, *[1] * (sigma.dim() - 1))
            self._pert_q = [
                torch.round(sigma * torch.randn(sigma.shape, generator=gen) / s)
                .clamp_(-127, 127)
                .to(torch.int8)
                for _ in range(self.bank_size)
            ]
            return
        if not self.inplace_capable:  # else built on demand: the in-place sampler has its own operands
            self._operands()
        if self.sampling == "bank":
            gen = self._bank_generator()
            self._bank = [self._pack(*self._sample(gen, k)) for k in range(self.bank_size)]

    def _bank_generator(self) -> torch.Generator:
        """The generator of this layer's banked samples: from the model seed and the layer's index."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * (self.index + 1)) % (2**63 - 1))

    def _draw(self, gen: torch.Generator | None, slot: int | None = None) -> tuple[int, bool, Tensor | None]:
        """One weight sample's pool window and random numbers (sign, then bias noise, in this order).

        The window is the MC index's (mc_predict: successive samples never share noise), else a random one.
        """
        if slot is None:
            slot = self._mc_index
            if slot is None:
                slot = int(torch.randint(0, self.noise_slots, (1,), generator=gen))
        negate = noise.draw_sign(gen)
        eps_b = None
        if self.bias_q is not None and self.bias_sigma_q is not None:
            eps_b = torch.randn(self.bias_q.shape, generator=gen)
        return slot % self.noise_slots, negate, eps_b

    def _bias(self, eps_b: Tensor | None) -> Tensor | None:
        if self.bias_q is None:
            return None
        b = self.bias_q.float()
        if eps_b is not None:
            b = b + self.bias_sigma_q.float() * eps_b
        return b * self._bias_scale

    def _operands(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mu32, sg32, pool) of the re-packing path (noise.fixed_point), cached."""
        if self._fresh is None:
            mu32, sg32 = noise.fixed_point(
                self._deq(self.mu_q, self.mu_scale), self._deq(self.sigma_q, self.sigma_scale), self._w_scale
            )
            self._fresh = (
                mu32,
                sg32,
                noise.noise_pool(self.seed, self.index, mu32.numel(), self.noise_slots),
            )
        return self._fresh

    def _make(self, slot: int, negate: bool, eps_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        mu32, sg32, pool = self._operands()
        offset = noise.window_offset(slot, mu32.numel(), self.noise_slots)
        q = noise.sample_int8(mu32, sg32, pool, offset, negate)
        return torch._make_per_channel_quantized_tensor(q, self._w_scale64, self._zeros, 0), self._bias(eps_b)

    def _sample(self, gen: torch.Generator | None, slot: int | None = None) -> tuple[Tensor, Tensor | None]:
        return self._make(*self._draw(gen, slot))

    def fresh_job(self) -> Callable[[], object]:
        """Draw this forward's random numbers now (global generator) and return the pack job for later."""
        draws = self._draw(None)
        return lambda: self._pack(*self._make(*draws))

    def _pack(self, qw: Tensor, bias: Tensor | None):
        if self.kind == "linear":
            return torch.ops.quantized.linear_prepack(qw, bias)
        c = self.config
        prepack = getattr(torch.ops.quantized, f"{self.kind}_prepack")
        return prepack(qw, bias, c["stride"], c["padding"], c["dilation"], c["groups"])

    def mean_packed(self):
        """Packed int8 mu (cached)."""
        if self._mean_packed is None:
            set_backend(self.backend)
            qw = torch._make_per_channel_quantized_tensor(self.mu_q, self.mu_scale.double(), self._zeros, 0)
            bias = None if self.bias_q is None else self.bias_q.float() * self._bias_scale
            self._mean_packed = self._pack(qw, bias)
        return self._mean_packed

    def _check_flipout(self) -> None:
        if "pert_scale" not in self.config:
            raise ValueError(
                "sampling='flipout' needs the calibrated ranges of INT8 Flipout's two terms: quantize with "
                "quantize_bnn(..., mode='flipout') or prepare(..., per_example=True) + calibrate + convert"
            )
        if not (
            self.backend in ("x86", "onednn") and self.kind in ("conv2d", "linear") and native.available()
        ):
            raise ValueError(
                f"sampling='flipout' runs on oneDNN kernels: it needs backend x86 or onednn (got "
                f"{self.backend!r}), conv2d/linear layers (got {self.kind}) and qbdl's C++ ops "
                f"(available: {native.available()}); use 'fresh' or 'bank' otherwise"
            )

    def _flipout_packed(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(packed int8 mu, packed perturbations), packed for x's qparams on the first sampled forward."""
        if self._flip is None:
            c, shape = self.config, list(x.shape)
            if self.kind == "linear":
                mu = torch.ops.onednn.qlinear_prepack(self.mu_q, shape)
                pert = [torch.ops.onednn.qlinear_prepack(w, shape) for w in self._pert_q]
            else:

                def pack(w: Tensor, scale: Tensor, x_scale: float, x_zp: int) -> Tensor:
                    return torch.ops.onednn.qconv_prepack(
                        w, scale, x_scale, x_zp, c["stride"], c["padding"], c["dilation"], c["groups"], shape
                    )

                mu = pack(self.mu_q, self.mu_scale.float(), x.q_scale(), x.q_zero_point())
                pert = [pack(w, self._pert_w_scale, 2 * x.q_scale(), self._flip_zp) for w in self._pert_q]
            self._flip = (mu, pert)
        return self._flip

    def _onednn(
        self,
        xu: Tensor,
        xs: float,
        xz: int,
        w: Tensor,
        ws: Tensor,
        bias,
        os: float,
        oz: int,
        post: str = "none",
    ) -> Tensor:
        """oneDNN INT8 conv2d/linear on plain uint8 activations (x: scale xs, zero point xz) -> uint8."""
        if self.kind == "linear":
            return torch.ops.onednn.qlinear_pointwise(
                xu, xs, xz, w, ws, self._w_zp, bias, os, oz, torch.uint8, post, [], ""
            )
        c = self.config
        return torch.ops.onednn.qconv2d_pointwise(
            xu, xs, xz, w, ws, self._w_zp, bias, c["stride"], c["padding"], c["dilation"], c["groups"],
            os, oz, torch.uint8, post, [], "",
        )  # fmt: skip

    def _record(self, x: Tensor, xs: float, xz: int, w: Tensor, ws: Tensor, bias, y: Tensor, os: float, oz: int,
                relu: bool, qmax: int) -> None:  # fmt: skip
        if self.trace is not None:
            self.trace.append({
                "x": x.clone(), "xs": xs, "xz": xz, "w": w.clone(), "ws": ws.clone(),
                "bias": None if bias is None else bias.clone(), "y": y.clone(), "os": os, "oz": oz,
                "relu": relu, "qmax": qmax, "kind": self.kind, "config": dict(self.config),
            })  # fmt: skip

    def _flipout_forward(self, x: Tensor) -> Tensor:
        """y = conv(x, mu) + s_out * conv(x * s_in, delta_k): per-example, per-channel signs (Wen et al. 2018)."""
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        mu, pert = self._flipout_packed(x)
        i = self._mc_index
        k = int(torch.randint(0, self.bank_size, (1,))) if i is None else i % self.bank_size
        batch, c_out = x.shape[0], self.mu_q.shape[0]
        s_in = torch.randint(0, 2, (batch, x.shape[1]), dtype=torch.int8).mul_(2).sub_(1)
        s_out = torch.randint(0, 2, (batch, c_out), dtype=torch.int8).mul_(2).sub_(1)
        _, _, eps_b = self._draw(None)
        c = self.config
        xs, xz = x.q_scale(), x.q_zero_point()
        xu = torch.ops.qbdl.as_uint8(x)
        bias = self._bias(None)
        # bias noise goes into the sign-flipped term, as in FP32 Flipout: one draw per example
        bias_noise = None if eps_b is None else self.bias_sigma_q.float() * eps_b * self._bias_scale
        y1 = self._onednn(xu, xs, xz, mu, self.mu_scale.float(), bias, c["mean_scale"], c["mean_zp"])
        self._record(
            xu, xs, xz, self.mu_q, self.mu_scale, bias, y1, c["mean_scale"], c["mean_zp"], False, 255
        )
        # x * s_in needs signs: uint8 with zero point (qmax+1)/2 at twice the scale (one bit of the input lost;
        # reduced range: 0..128 at most, whose int16 pair sums 2 * 128 * 127 still fit)
        xf = torch.ops.qbdl.flip_requant(xu, s_in, xz, 0.5, self._flip_zp)
        y2 = self._onednn(
            xf, 2 * xs, self._flip_zp, pert[k], self._pert_w_scale, bias_noise, c["pert_scale"], 128
        )
        self._record(xf, 2 * xs, self._flip_zp, self._pert_q[k], self._pert_w_scale, bias_noise, y2,
                     c["pert_scale"], 128, False, 255)  # fmt: skip
        out = torch.ops.qbdl.signed_add(
            y1, c["mean_scale"], c["mean_zp"], y2, c["pert_scale"], 128, s_out, self.out_scale, self.out_zp,
            self.relu,
        )  # fmt: skip
        return clamp_qmax(torch.ops.qbdl.as_quint8(out, self.out_scale, self.out_zp), self.qmax)

    @property
    def _flip_zp(self) -> int:
        return (self.qmax + 1) // 2

    def set_mc_index(self, index: int | None) -> None:
        """Select bank entry index mod K for the following forwards (None: a random entry per forward)."""
        self._mc_index = index

    def sampled_int8_weight(self) -> Tensor:
        """One fresh int8 weight sample (global generator) as a per-channel quantized tensor; for tests.

        With the in-place kernel (after a first forward) the sample is written to the packed weight and
        read back, so it is exactly what that path computes with.
        """
        if self._sampler is None:
            return self._sample(None)[0]
        slot, negate, _ = self._draw(None)
        q = self._sampler.unpacked(self._sampler.sample(slot, negate), tuple(self.mu_q.shape))
        return torch._make_per_channel_quantized_tensor(q, self._w_scale64, self._zeros, 0)

    @property
    def inplace_capable(self) -> bool:
        """True when fresh samples can be written into oneDNN-packed weights (checked again on first use)."""
        return (
            self.bayesian
            and self.sampling == "fresh"
            and self.fresh_kernel == "auto"
            and self.kind in ("conv2d", "linear")
            and self.backend in ("x86", "onednn")
            and self.mu_q.shape[0] <= torch.iinfo(torch.int16).max
            and native.available()
        )

    def _inplace_sampler(self, x: Tensor) -> inplace.PackedSampler | None:
        """The in-place sampler, built on the first sampled forward (it needs the input's shape and qparams)."""
        if self._sampler is None and self.inplace_capable:
            c, shape, x_shape = self.config, tuple(self.mu_q.shape), list(x.shape)
            ws = self._w_scale.float()
            if self.kind == "linear":

                def pack(w: Tensor) -> Tensor:
                    return torch.ops.onednn.qlinear_prepack(w, x_shape)
            else:

                def pack(w: Tensor) -> Tensor:
                    return torch.ops.onednn.qconv_prepack(
                        w, ws, x.q_scale(), x.q_zero_point(), c["stride"], c["padding"], c["dilation"],
                        c["groups"], x_shape,
                    )  # fmt: skip

            layout = inplace.discover_layout(pack, shape)
            if layout is None:
                self.fresh_kernel = "prepack"  # this layer's packed format is not a plain permutation
                return None
            mu16, sg16 = noise.fixed_point16(
                self._deq(self.mu_q, self.mu_scale), self._deq(self.sigma_q, self.sigma_scale), self._w_scale
            )
            pool = noise.noise_pool(self.seed, self.index, layout.data_bytes, self.noise_slots)
            self._sampler = inplace.PackedSampler(pack, layout, mu16, sg16, pool, self.noise_slots)
        return self._sampler

    def _inplace_forward(self, x: Tensor, sampler: inplace.PackedSampler, draws: tuple) -> Tensor:
        slot, negate, eps_b = draws
        w, bias = sampler.sample(slot, negate), self._bias(eps_b)
        xu = torch.ops.qbdl.as_uint8(x)
        y = self._onednn(
            xu, x.q_scale(), x.q_zero_point(), w, self._w_scale.float(),
            bias, self.out_scale, self.out_zp, "relu" if self.relu else "none",
        )  # fmt: skip
        y = clamp_qmax(torch.ops.qbdl.as_quint8(y, self.out_scale, self.out_zp), self.qmax)
        if self.trace is not None:
            wq = sampler.unpacked(w, tuple(self.mu_q.shape))
            self._record(xu, x.q_scale(), x.q_zero_point(), wq, self._w_scale, bias, torch.ops.qbdl.as_uint8(y),
                         self.out_scale, self.out_zp, self.relu, self.qmax)  # fmt: skip
        return y

    def forward(self, x: Tensor) -> Tensor:
        # Kernels run whatever engine packed the weights; only packing reads the global engine.
        if not self.bayesian or self.mode == "mean":
            packed = self.mean_packed()
        elif self.sampling == "flipout":
            return self._flipout_forward(x)
        elif self.sampling == "bank":
            i = self._mc_index
            i = int(torch.randint(0, self.bank_size, (1,))) if i is None else i % self.bank_size
            packed = self._bank[i]
        elif self._pending_draws is not None or self.inplace_capable:
            draws, self._pending_draws = self._pending_draws, None
            draws = self._draw(None) if draws is None else draws
            sampler = self._inplace_sampler(x)
            if sampler is not None:
                return self._inplace_forward(x, sampler, draws)
            packed = self._pack(*self._make(*draws))  # layout check failed: same draws, re-packed
        elif self._pending is not None:  # prefetched by the model's pre-hook (same draws, same order)
            packed, self._pending = self._pending.result(), None
        else:
            engine = torch.backends.quantized.engine
            torch.backends.quantized.engine = fresh_pack_engine(self, x.shape[0])
            try:
                packed = self._pack(*self._sample(None))
            finally:
                torch.backends.quantized.engine = engine
        if self.kind == "linear":
            op = torch.ops.quantized.linear_relu if self.relu else torch.ops.quantized.linear
        else:
            op = getattr(torch.ops.quantized, f"{self.kind}_relu" if self.relu else self.kind)
        y = clamp_qmax(op(x, packed, self.out_scale, self.out_zp), self.qmax)
        if self.trace is not None:
            w, bias = packed.unpack()
            self._record(x.int_repr(), x.q_scale(), x.q_zero_point(), w.int_repr(), w.q_per_channel_scales(), bias,
                         y.int_repr(), self.out_scale, self.out_zp, self.relu, self.qmax)  # fmt: skip
        return y

    def set_sampling(self, sampling: str, bank_size: int | None = None, seed: int | None = None) -> None:
        """Switch between 'fresh' and 'bank' (rebuilds the bank)."""
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")
        self.sampling = self.config["sampling"] = sampling
        if bank_size is not None:
            self.bank_size = self.config["bank_size"] = int(bank_size)
        if seed is not None:
            self.seed = self.config["seed"] = int(seed)
        self._build()

    def spec(self) -> dict:
        """JSON-able config (tensors are saved separately)."""
        c = dict(self.config)
        if self.bayesian:
            c["mode"] = self.mode
        return c

    def extra_repr(self) -> str:
        s = f"{self.kind}, out={tuple(self.mu_q.shape)}, relu={self.relu}, backend={self.backend}"
        if self.bayesian:
            s += f", mode={self.mode}, sampling={self.sampling}"
            if self.sampling == "bank":
                s += f", K={self.bank_size}"
        return s


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def _executor(workers: int) -> ThreadPoolExecutor:
    ex = _EXECUTORS.get(workers)
    if ex is None:
        ex = _EXECUTORS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="qbdl-pack")
    return ex


SMALL_BATCH = 4


def fresh_pack_engine(layer: QuantLayer, batch: int) -> str:
    """Engine that packs fresh samples: the plan's small-batch engine (fbgemm where it is exact) at batch <=
    SMALL_BATCH, else the layer's backend.

    Why: at small batch re-packing dominates a fresh forward and fbgemm packs ~1.3-2x faster than
    oneDNN here; at large batch oneDNN's faster kernels matter more. Packed params carry their own
    kernels, so the layers of one model may mix engines. Depends only on the batch size: deterministic.
    """
    return layer.config.get("small_batch_engine", layer.backend) if batch <= SMALL_BATCH else layer.backend


def _prefetch_hook(model: nn.Module, args) -> None:
    layers = [
        m
        for m in model.modules()
        if isinstance(m, QuantLayer) and m.bayesian and m.mode == "sample" and m.sampling == "fresh"
    ]
    if not layers:
        return
    ex = _executor(getattr(model, "_qbdl_pack_workers", 2))
    batch = args[0].shape[0] if args and isinstance(args[0], Tensor) and args[0].dim() > 0 else 1
    # set once, before the workers start, restored by the post-hook: no thread switches it mid-forward
    model._qbdl_engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = fresh_pack_engine(layers[0], batch)
    # Draw every layer's random numbers now, in layer order (exactly what the sequential path draws), then
    # sample + pack in worker threads while the forward runs: packing is the dominant cost at small batch.
    for m in layers:
        if m._pending is not None:
            m._pending.cancel()
            m._pending = None
        if m.inplace_capable:  # sampled into its packed weight right before its kernel: nothing to prefetch
            m._pending_draws = m._draw(None)
        else:
            m._pending = ex.submit(m.fresh_job())


def enable_prefetch(model: nn.Module, workers: int = 2) -> nn.Module:
    """Pack fresh-mode weight samples in `workers` background threads during the forward (0: off)."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if hook in (_prefetch_hook, _restore_engine_hook):
                del hooks[key]
    if workers > 0:
        model._qbdl_pack_workers = workers
        model.register_forward_pre_hook(_prefetch_hook)
        model.register_forward_hook(_restore_engine_hook)
    return model


def _restore_engine_hook(model: nn.Module, args, output) -> None:
    engine = getattr(model, "_qbdl_engine", None)
    if engine is not None:
        for m in model.modules():  # every prefetched pack has been consumed by now
            if isinstance(m, QuantLayer) and m._pending is not None:
                m._pending.result()
        torch.backends.quantized.engine = engine
        model._qbdl_engine = None
