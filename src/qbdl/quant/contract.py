"""The sampler contract: what a sampler may ask of its INT8 layer, the Sampler base class and the registry.

A sampler decides the weights of each forward of a Bayesian QuantLayer (layers.py). It may use only what
:class:`SampledLayer` lists; QuantLayer provides all of it. A new sampler is one subclass of :class:`Sampler`
decorated with :func:`register`: its `name` is then accepted by quantize_bnn, convert, set_sampler and
QuantLayer, and its class attributes say what the rest of qbdl must do for it (per-example calibration
ranges, a shared weight sample for QAT and the fidelity tools, the prefetch hook). This module imports no
other part of qbdl, so the layers, the samplers and the pipeline all depend on it and never on each other.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch
from torch import Tensor

# what Sampler.weights returns: (packed weight, weight scales, float bias, int8 weight or None)
Weights = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


class SampledLayer(Protocol):
    """What a sampler may read and call on its layer (QuantLayer implements it)."""

    config: dict
    kind: str  # conv1d | conv2d | conv3d | linear
    index: int  # the layer's position in the model: part of its noise key
    seed: int
    bank_size: int
    noise: str  # "counter" (noise.py) or "pool" (an older file's bank)
    fresh_kernel: str  # "auto" or "prepack"; a sampler may fall back to "prepack"
    qmax: int
    relu: bool
    in_scale: float
    in_zp: int | None
    out_scale: float
    out_zp: int
    mu_q: Tensor  # reading mu_q / sigma_q restores them where released (release_int8): hot paths read weight_shape
    mu_scale: Tensor
    sigma_q: Tensor | None
    sigma_scale: Tensor | None
    bias_q: Tensor | None
    bias_sigma_q: Tensor | None
    trace: list[dict] | None  # not None: every kernel call is recorded (record())
    w_scale: Tensor  # per-channel scale of sampled weights; the int32 bias is in units of in_scale * w_scale
    bias_scale: Tensor  # in_scale * w_scale

    @property
    def bayesian(self) -> bool:
        """True when the layer samples its weights (it has a sigma)."""

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The int8 weight's shape, output channel first."""

    @property
    def mc_index(self) -> int | None:
        """The MC sample index of the following forwards (None: draw from the global generator)."""

    def draw(self, gen: torch.Generator | None, index: int | None = None) -> tuple[int, bool, Tensor | None]:
        """One weight sample's (noise key, sign, bias noise), drawn in the layer's fixed order."""

    def make_sample(self, draw: int, negate: bool, eps_b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The int8 weight (scale w_scale) and float bias of one draw."""

    def float_bias(self, eps_b: Tensor | None) -> Tensor | None:
        """The float bias (with bias noise eps_b) in units of the kernel's output."""

    def operands(self, keep: bool = True) -> tuple[Tensor, Tensor]:
        """int16 fixed-point (mu / S, sigma / S) of the sampling kernels."""

    def drop_operands(self) -> None:
        """Forget the cached operands (a sampler that packed all it needs)."""

    def release_int8(self, mu16: Tensor, sg16: Tensor) -> bool:
        """Free int8 mu and sigma while a sampler holds their operands (restored exactly when read)."""

    def bank_generator(self) -> torch.Generator:
        """The generator of banked draws, seeded from the model seed and the layer index."""

    def prepack(self, w: Tensor, w_scale: Tensor, x_scale: float, x_zp: int) -> Tensor:
        """oneDNN-packed int8 weight for this layer's kernel."""

    def kernel(
        self, xu: Tensor, xs: float, xz: int, w: Tensor, ws: Tensor, bias: Tensor | None, os: float, oz: int,
        post: str = "none",
    ) -> Tensor:  # fmt: skip
        """oneDNN INT8 conv/linear on uint8 `xu` with a packed weight -> uint8."""

    def record(
        self, x: Tensor, xs: float, xz: int, w: Tensor, ws: Tensor, bias: Tensor | None, y: Tensor, os: float,
        oz: int, relu: bool, qmax: int,
    ) -> None:  # fmt: skip
        """Append one kernel call to `trace` (when tracing)."""

    def run(
        self, x: Tensor, packed: Tensor, ws: Tensor, bias: Tensor | None, w: Tensor | None = None
    ) -> Tensor:
        """The layer's own kernel (in/out qparams, fused ReLU, 0..qmax) on uint8 `x`."""


class Sampler:
    """One layer's way of choosing its weights; `forward` runs the layer's kernel with them.

    Class attributes a subclass sets to tell qbdl what it needs:
    needs_input_ranges: calibration must record per-example ranges (prepare(..., per_example=True));
    shared_sample: one weight sample per forward, shared by the batch, which int8_sample returns (QAT
    converts to it, the fidelity tools emulate it);
    prefetches: the model's pre-forward hook calls prefetch() in layer order;
    pool_noise: an older file's pool noise serves it (other samplers drop the pool and count).
    """

    name = ""
    needs_input_ranges = False
    shared_sample = False
    prefetches = False
    pool_noise = False
    _unpicklable: tuple[str, ...] = ()  # attributes that hold packed weights or pending work

    def __init__(self, layer: SampledLayer) -> None:
        """Build from the layer's int8 tensors and seed (banked samplers draw their samples now)."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in self._unpicklable:
            state[k] = None
        return state

    def weights(self, layer: SampledLayer) -> Weights:
        """(packed weight, its scales, float bias, the int8 weight when layer.trace is on) for this forward."""
        raise NotImplementedError

    def forward(self, layer: SampledLayer, x: Tensor) -> Tensor:
        """The layer's output on uint8 `x` with this forward's weights."""
        packed, ws, bias, w = self.weights(layer)
        return layer.run(x, packed, ws, bias, w)

    def prefetch(self, layer: SampledLayer, executor: ThreadPoolExecutor) -> None:
        """Draw this forward's random numbers now, in the model's layer order (when `prefetches`)."""

    def int8_sample(self, layer: SampledLayer) -> tuple[Tensor, Tensor | None]:
        """The int8 weight (scale layer.w_scale) and float bias the next forward computes with.

        Draws the layer's random numbers from the global generator exactly as that forward would (the MC
        index decides where set), so a caller can replay the sample; only samplers with `shared_sample`.
        """
        raise NotImplementedError(f"sampler {self.name!r} has no weight sample shared by the batch")

    def can_write_in_place(self, layer: SampledLayer) -> bool:
        """True when this sampler writes its samples into oneDNN-packed weights for this layer."""
        return False

    def describe(self, layer: SampledLayer) -> str:
        """Extra text for the layer's repr (e.g. the bank size)."""
        return ""


_REGISTRY: dict[str, type[Sampler]] = {}


def register(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: make `cls.name` a sampler every part of qbdl accepts."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls:
        raise ValueError(f"sampler {cls.name!r} is already registered ({old.__module__}.{old.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a registered sampler (tests that register their own)."""
    _REGISTRY.pop(name, None)


def sampler_names() -> tuple[str, ...]:
    """The registered sampler names, in registration order."""
    return tuple(_REGISTRY)


def sampler_class(name: Any) -> type[Sampler]:
    """The sampler class registered as `name`; the one place sampler names are checked."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(_REGISTRY)}")
    return cls
