"""The INT8 conv/linear layer of a QBNN on plain uint8 / int8 tensors; how it samples is in samplers.py."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from . import inplace, noise
from .activations import clamp_qmax
from .backend import FULL_QMAX, check_backend
from .contract import Sampler, sampler_class
from .release import ReleasableInt8
from .samplers import BankSampler, MeanSampler

FRESH_KERNELS = ("auto", "prepack")  # auto: write samples into oneDNN-packed weights where possible
KINDS = ("conv1d", "conv2d", "conv3d", "linear")


class QuantLayer(ReleasableInt8):
    """INT8 conv/linear on uint8 activations: int8 mu (and sigma for a Bayesian layer) per output channel.

    Deterministic (sigma None): one packed int8 weight. Bayesian: `mode` 'mean' uses int8 mu; 'sample'
    asks its `sampler` (samplers.py): 'fresh' = a new int8 weight every forward (counter-based noise generated
    in the kernel, see noise.py: MC index s has its own noise, a forward without one takes a counter from the
    global generator), written into the packed weight in place (inplace.py) or re-packed; 'bank' = K samples
    (the counter noise of MC indices 0..K-1) quantized and packed once, MC sample s uses entry s mod K
    (set_mc_index), a random entry from the global generator when no index is set; 'flipout' = per-example
    signs over K banked perturbations.
    Sampled weights use the fixed per-channel scale S = max(|mu| + 3 sigma)/127, so the int32 bias (in
    units of input_scale * S) is exact for every sample. Every kernel is a oneDNN op on plain uint8 / int8
    tensors; the input's scale and zero point are `in_scale` / `in_zp` (set from the graph). What a sampler
    may use of this layer is contract.SampledLayer.
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
        old = noise.upgrade_config(c)
        if old is not None and sigma_q is not None:
            warnings.warn(old, RuntimeWarning, stacklevel=2)
        check_backend(c["backend"])
        self.kind: str = c["kind"]
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; INT8 layers are {KINDS}")
        self.relu: bool = c["relu"]
        self.in_scale: float = c["in_scale"]
        self.in_zp: int | None = c.get("in_zp")  # None until wired: files of format 1 did not store it
        self.out_scale, self.out_zp = float(c["out_scale"]), int(c["out_zp"])
        # activations 0..qmax (in and out): 127 where a kernel of this model sums u8*s8 pairs in int16
        self.qmax: int = int(c.get("qmax", FULL_QMAX))
        self.backend: str = c["backend"]
        self.sampler: str = c.get("sampler", "fresh")
        sampler_class(self.sampler)  # refuses an unknown name before any tensor is built
        self.bank_size: int = int(c.get("bank_size", 16))
        self.seed: int = int(c.get("seed", 0))
        self.index: int = int(c.get("index", 0))
        # "counter": noise generated from (seed, index, MC counter, position); "pool": a bank of an older file
        self.noise: str = noise.generator(c)
        self.noise_slots: int = int(c.get("noise_slots", noise.NOISE_SLOTS))  # pool noise only
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
        self._build()

    def set_input_qparams(self, scale: float, zero_point: int) -> None:
        """The qparams of the uint8 activation this layer reads (from the graph; checked against calibration)."""
        if abs(scale - self.in_scale) > 1e-9 * max(1.0, abs(scale)):
            raise ValueError(
                f"INT8 layer {self.index}: its input has scale {scale} but its bias was quantized for "
                f"{self.in_scale}: the graph and the layer disagree (a corrupt or hand-edited model file)"
            )
        self.in_zp = self.config["in_zp"] = int(zero_point)

    # -- derived state (never saved: rebuilt from the int8 tensors and the seed)

    @property
    def bayesian(self) -> bool:
        """True when the layer holds a sigma (samples weights)."""
        return self._released is not None or self._buffers.get("sigma_q") is not None

    def weight_scale(self) -> Tensor:
        """Per-channel scale of the weights the int32 bias refers to (S of samples, or mu's scale)."""
        if not self.bayesian:
            return self.mu_scale
        return noise.sample_scale(
            noise.dequantize(self.mu_q, self.mu_scale), noise.dequantize(self.sigma_q, self.sigma_scale)
        )

    def _build(self) -> None:
        self.w_scale: Tensor = self.weight_scale()  # what the samplers and the int32 bias use
        self.bias_scale: Tensor = self.in_scale * self.w_scale
        self._w_zp = torch.zeros(self.weight_shape[0], dtype=torch.int32)  # oneDNN ops: symmetric weights
        self._x_shape: list[int] | None = None  # the first input's shape, which packing is tuned for
        self._ops: tuple[Tensor, Tensor] | None = None  # int16 operands of the re-packing path, cached
        self._mean = MeanSampler()
        # the sampler of mode 'sample' (the bank and flipout ones draw their samples now, from the seed)
        self.impl: Sampler = sampler_class(self.sampler)(self) if self.bayesian else self._mean

    @property
    def mc_index(self) -> int | None:
        """The MC sample index of the following forwards (set_mc_index; None: the global generator)."""
        return self._mc_index

    def bank_generator(self) -> torch.Generator:
        """The generator of this layer's banked samples: from the model seed and the layer's index."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * (self.index + 1)) % (2**63 - 1))

    def draw(self, gen: torch.Generator | None, index: int | None = None) -> tuple[int, bool, Tensor | None]:
        """One weight sample's noise key, sign and bias noise, drawn in this order.

        Counter noise: the key of MC index `index` (else the layer's MC index, else a counter from `gen`: None is
        the global generator, so seeds reproduce), sign always False (the key already makes the sample new).
        Pool noise (older files' banks): the window `index` mod slots and a random sign, as those files drew them.
        """
        if index is None:
            index = self._mc_index
        if self.noise == "pool":
            if index is None:
                index = int(torch.randint(0, self.noise_slots, (1,), generator=gen))
            draw, negate = index % self.noise_slots, noise.draw_sign(gen)
        elif index is None:
            draw, negate = noise.key(self.seed, self.index, noise.random_counter(gen), random=True), False
        else:
            draw, negate = noise.key(self.seed, self.index, index), False
        eps_b = None
        if self.bias_q is not None and self.bias_sigma_q is not None:
            eps_b = torch.randn(self.bias_q.shape, generator=gen)
        return draw, negate, eps_b

    def float_bias(self, eps_b: Tensor | None) -> Tensor | None:
        """The float bias (bias noise eps_b added) in the kernel's units (input scale * w_scale)."""
        if self.bias_q is None:
            return None
        b = self.bias_q.float()
        if eps_b is not None:
            b = b + self.bias_sigma_q.float() * eps_b
        return b * self.bias_scale

    def make_sample(self, draw: int, negate: bool, eps_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """One int8 weight sample (original order; scale w_scale) and its float bias, from `draw`'s output.

        Nothing is cached: the counter noise is regenerated from the key (the C++ op, ~1 ns a weight), and a
        pool window of an older file is redrawn (only its bank calls this, once per entry).
        """
        if self.noise == "pool":
            z = noise.legacy_window(self.seed, self.index, self.mu_q.numel(), draw)
            mu = noise.dequantize(self.mu_q, self.mu_scale)
            sigma = noise.dequantize(self.sigma_q, self.sigma_scale)
            return noise.legacy_sample(mu, sigma, self.w_scale, z, negate), self.float_bias(eps_b)
        return noise.sample_int8(*self.operands(), draw), self.float_bias(eps_b)

    def operands(self, keep: bool = True) -> tuple[Tensor, Tensor]:
        """int16 (mu/S, sigma/S) fixed point of the sampling kernels (noise.operands); cached when `keep`."""
        if self._ops is not None:
            return self._ops
        ops = noise.operands(
            noise.dequantize(self.mu_q, self.mu_scale), noise.dequantize(self.sigma_q, self.sigma_scale),
            self.w_scale,
        )  # fmt: skip
        if keep:
            self._ops = ops
        return ops

    def drop_operands(self) -> None:
        """Forget the cached int16 operands (a sampler that has packed every sample it needs)."""
        self._ops = None

    def bank_weight(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Bank entry i's int8 weight and float bias (what sampler='bank' computes with at MC index i)."""
        if not isinstance(self.impl, BankSampler):
            raise ValueError(f"INT8 layer {self.index} has no bank (sampler {self.sampler!r})")
        return self.impl.weight(self, i)

    def prepack(self, w: Tensor, w_scale: Tensor, x_scale: float, x_zp: int) -> Tensor:
        """The oneDNN-packed int8 weight `w` (scales w_scale) for inputs of scale x_scale, zero point x_zp."""
        # packed for the first input's shape: oneDNN picks its kernel by it (a 512-channel 3x3 conv on 7x7
        # runs 4x slower packed without one); other batch sizes reuse it
        x_shape = self._x_shape
        if self.kind == "linear":
            return torch.ops.onednn.qlinear_prepack(w, x_shape)
        if self.kind == "conv1d":  # as a conv2d over a height-1 image (exact: the same sums)
            w = w.unsqueeze(2)
            x_shape = None if x_shape is None else [x_shape[0], x_shape[1], 1, x_shape[2]]
        return torch.ops.onednn.qconv_prepack(
            w, w_scale.float(), x_scale, x_zp, *self._conv_args(), x_shape
        )  # fmt: skip

    def _conv_args(self) -> tuple:
        c = self.config
        if self.kind == "conv1d":
            return [1, *c["stride"]], [0, *c["padding"]], [1, *c["dilation"]], c["groups"]
        return c["stride"], c["padding"], c["dilation"], c["groups"]

    def kernel(
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
        """oneDNN INT8 conv/linear on plain uint8 activations (x: scale xs, zero point xz) -> uint8."""
        if self.kind == "linear":
            return torch.ops.onednn.qlinear_pointwise(
                xu, xs, xz, w, ws, self._w_zp, bias, os, oz, torch.uint8, post, [], ""
            )
        if self.kind == "conv1d":
            xu = xu.unsqueeze(2)
        if self.kind == "conv3d" and post == "relu":
            # oneDNN fuses no ReLU into conv3d; max(q, zp) after the kernel is the same
            return self.kernel(xu, xs, xz, w, ws, bias, os, oz).clamp_(min=oz)
        y = torch.ops.onednn.qconv_pointwise(
            xu, xs, xz, w, ws, self._w_zp, bias, *self._conv_args(), os, oz, torch.uint8, post, [], ""
        )  # fmt: skip
        return y.squeeze(2) if self.kind == "conv1d" else y

    def record(self, x: Tensor, xs: float, xz: int, w: Tensor, ws: Tensor, bias, y: Tensor, os: float, oz: int,
               relu: bool, qmax: int) -> None:  # fmt: skip
        """Append one kernel call (operands, qparams, output) to `trace` when tracing is on."""
        if self.trace is not None:
            self.trace.append({
                "x": x.clone(), "xs": xs, "xz": xz, "w": w.clone(), "ws": ws.clone(),
                "bias": None if bias is None else bias.clone(), "y": y.clone(), "os": os, "oz": oz,
                "relu": relu, "qmax": qmax, "kind": self.kind, "config": dict(self.config),
            })  # fmt: skip

    def run(
        self, x: Tensor, packed: Tensor, ws: Tensor, bias: Tensor | None, w: Tensor | None = None
    ) -> Tensor:
        """This layer's kernel on uint8 `x` with a packed weight (scales `ws`); `w`: its int8 weight, traced."""
        post = "relu" if self.relu else "none"
        y = self.kernel(
            x, self.in_scale, self.in_zp, packed, ws.float(), bias, self.out_scale, self.out_zp, post
        )
        y = clamp_qmax(y, self.qmax)
        self.record(
            x, self.in_scale, self.in_zp, w, ws, bias, y, self.out_scale, self.out_zp, self.relu, self.qmax
        )
        return y

    def set_mc_index(self, index: int | None) -> None:
        """Select bank entry index mod K for the following forwards (None: a random entry per forward)."""
        self._mc_index = index

    @property
    def inplace_sampler(self) -> inplace.PackedSampler | None:
        """The in-place sampler of a 'fresh' layer once its first sampled forward built it (None otherwise)."""
        return getattr(self.impl, "inplace", None)

    def int8_sample(self) -> tuple[Tensor, Tensor | None]:
        """The int8 weight (scale w_scale) and float bias of the next sampled forward (its sampler's draws)."""
        return self.impl.int8_sample(self)

    def sampled_int8_weight(self) -> Tensor:
        """One fresh int8 weight sample (global generator; scale weight_scale()); for tests.

        With the in-place kernel (after a first forward) the sample is written to the packed weight and
        read back, so it is exactly what that path computes with.
        """
        packed = self.inplace_sampler
        if packed is None:
            return self.make_sample(*self.draw(None))[0]
        draw, negate, _ = self.draw(None)
        return packed.unpacked(packed.sample(draw, negate), self.weight_shape)

    @property
    def inplace_capable(self) -> bool:
        """True when fresh samples can be written into oneDNN-packed weights (checked again on first use)."""
        return self.bayesian and self.impl.can_write_in_place(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:  # a batch of 0: oneDNN must never see an empty tensor (it divides by the batch)
            return self._empty_output(x)
        if self._x_shape is None:
            self._x_shape = list(x.shape)
        try:
            return (self.impl if self.bayesian and self.mode == "sample" else self._mean).forward(self, x)
        except RuntimeError as exc:
            if "primitive" not in str(exc) and "oneDNN" not in str(exc):
                raise
            # oneDNN refuses shapes it cannot run (a graph reshaped by a hand-edited file, a too-small image)
            raise ValueError(
                f"INT8 layer {self.index} ({self.kind}, weight {list(self.weight_shape)}) cannot run on an input of "
                f"shape {list(x.shape)}: oneDNN found no kernel for it. The input does not fit the model (image "
                "size or channels) or the model file's graph was edited; check the input, or re-create the file "
                "with qbdl.quant.save_qbnn"
            ) from None

    def _empty_output(self, x: Tensor) -> Tensor:
        """The uint8 output of an empty input: its shape by the conv/linear arithmetic, no kernel run."""
        c, oc = self.config, self.weight_shape[0]
        if self.kind == "linear":
            return torch.empty(*x.shape[:-1], oc, dtype=torch.uint8)
        k = self.weight_shape[2:]
        dims = [x.shape[0], oc]
        for i, n in enumerate(x.shape[2:]):
            d, p, s = c["dilation"][i], c["padding"][i], c["stride"][i]
            dims.append(max(0, (n + 2 * p - d * (k[i] - 1) - 1) // s + 1))
        fmt = torch.channels_last if self.kind == "conv2d" else torch.contiguous_format
        return torch.empty(dims, dtype=torch.uint8).contiguous(memory_format=fmt)

    def set_sampler(self, sampler: str, bank_size: int | None = None, seed: int | None = None) -> None:
        """Switch to another sampler (rebuilds the bank)."""
        cls = sampler_class(sampler)
        self.sampler = self.config["sampler"] = sampler
        if not cls.pool_noise:  # an older file's pool noise served its bank only: other samplers count
            self.config.pop("noise_slots", None)
        self.noise = noise.generator(self.config)
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
        s = f"{self.kind}, out={self.weight_shape}, relu={self.relu}"
        if self.bayesian:
            s += f", mode={self.mode}, sampler={self.sampler}" + self.impl.describe(self)
        return s


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}


def _executor(workers: int) -> ThreadPoolExecutor:
    ex = _EXECUTORS.get(workers)
    if ex is None:
        ex = _EXECUTORS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="qbdl-pack")
    return ex


def _prefetch_hook(model: nn.Module, args) -> None:
    workers = getattr(model, "qbdl_pack_workers", 2)
    layers = [
        m
        for m in model.modules()
        if isinstance(m, QuantLayer) and m.bayesian and m.mode == "sample" and m.impl.prefetches
    ]
    if workers <= 0 or not layers:
        return
    ex = _executor(workers)
    # Draw every layer's random numbers now, in layer order (exactly what the sequential path draws), then
    # sample + pack in worker threads while the forward runs: packing is the dominant cost at small batch.
    for m in layers:
        m.impl.prefetch(m, ex)


def enable_prefetch(model: nn.Module, workers: int = 2) -> nn.Module:
    """Pack fresh weight samples in `workers` background threads during the forward (0: off)."""
    # one hook per model, registered once (torch lists hooks only privately); `qbdl_pack_workers` switches it
    if not hasattr(model, "qbdl_pack_workers"):
        model.register_forward_pre_hook(_prefetch_hook)
    model.qbdl_pack_workers = int(workers)
    return model
