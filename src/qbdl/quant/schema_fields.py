"""The field rules of a `.qbdl` file's JSON document: types and ranges of every module config, the graph's
allowlists, and the per-layer tensor checks (the published table `MODULES`; docs: "The .qbdl file format")."""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable
from typing import Any

import torch

from ..bayes.layers import MODES
from .backend import BACKENDS, FULL_QMAX, REDUCED_QMAX
from .contract import sampler_names
from .layers import FRESH_KERNELS, KINDS
from .samplers import SAMPLERS

FORMAT_PREFIX = "qbdl-qbnn/"
# Bytes a file may ask qbdl to allocate for sampled weights (bank entries, flipout perturbations, noise pools):
# raise it with QBDL_MAX_SAMPLE_BYTES or load_qbnn(..., max_sample_bytes=...).
DEFAULT_MAX_SAMPLE_BYTES = 4 * 2**30
MAX_DIM = (
    1 << 16
)  # strides, padding, dilation, kernel and pooling sizes, channels: far above any real network
MAX_NODES = 100_000
MAX_NESTING = 8  # graph arguments: tuples/lists/slices nested deeper than this are refused
F32_NORMAL_MIN = 1.1754943508222875e-38  # float32's smallest normal: smaller scales lose their precision
F32_MAX = 3.4028234663852886e38
QMAXES = (REDUCED_QMAX, FULL_QMAX)
SEED_MAX = 2**63 - 1


class ModelFileError(ValueError):
    """A model file breaks its schema: the message names the file, the field and what was expected."""


def fail(path: str, where: str, got: Any, expected: str) -> None:
    """Raise the ModelFileError that names the file, the field, the value and what was expected."""
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ModelFileError(
        f"{path}: {where} is {shown}, expected {expected}. The file is corrupt, hand-edited or crafted: qbdl "
        "refuses it before using any of its values. Re-create it with qbdl.quant.save_qbnn from the run that "
        "made it (or quantize the BNN again)"
    )


# -- field types: each returns the (normalised) value or calls fail


def _int(lo: int, hi: int) -> Callable:
    def check(path: str, where: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            fail(path, where, v, f"an integer in [{lo}, {hi}]")
        return v

    check.doc = f"integer in [{lo}, {hi}]"
    return check


def _scale(path: str, where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        fail(path, where, v, "a finite positive number (a quantization scale)")
    if not F32_NORMAL_MIN <= v <= F32_MAX:
        fail(path, where, v, f"a scale in float32's normal range [{F32_NORMAL_MIN:.3g}, {F32_MAX:.3g}]")
    return float(v)


_scale.doc = "finite float in float32's normal range (> 0)"


def _bool(path: str, where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        fail(path, where, v, "true or false")
    return v


_bool.doc = "boolean"


def _enum(*names: str) -> Callable:
    def check(path: str, where: str, v: Any) -> str:
        if v not in names or not isinstance(v, str):
            fail(path, where, v, f"one of {list(names)}")
        return v

    check.doc = "one of " + ", ".join(names)
    return check


def _sampler(*legacy: str) -> Callable:
    """A sampler registered when the file is read (built-ins and any registered since), or a legacy name."""

    def check(path: str, where: str, v: Any) -> str:
        return _enum(*sampler_names(), *legacy)(path, where, v)

    check.doc = "a registered sampler (built in: " + ", ".join((*SAMPLERS, *legacy)) + ")"
    return check


def _ints(lo: int, hi: int, n: int | None = None, scalar: bool = False) -> Callable:
    """A list of integers in [lo, hi] (length n when given; a single integer too when `scalar`)."""

    def check(path: str, where: str, v: Any) -> Any:
        if scalar and isinstance(v, int) and not isinstance(v, bool):
            return _int(lo, hi)(path, where, v)
        if not isinstance(v, list) or (n is not None and len(v) != n) or not 1 <= len(v) <= 3:
            fail(
                path,
                where,
                v,
                f"a list of {n or '1-3'} integers in [{lo}, {hi}]" + (" or one integer" if scalar else ""),
            )
        for i, x in enumerate(v):
            _int(lo, hi)(path, f"{where}[{i}]", x)
        return v

    check.doc = f"list of integers in [{lo}, {hi}]" + (" (or one integer)" if scalar else "")
    return check


def _opt(check: Callable) -> Callable:
    """`check`, or null."""

    def opt(path: str, where: str, v: Any) -> Any:
        return None if v is None else check(path, where, v)

    opt.doc = f"{check.doc}, or null"
    return opt


def _output_size(path: str, where: str, v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return _int(1, 1024)(path, where, v)
    if not isinstance(v, list) or not 1 <= len(v) <= 3:
        fail(path, where, v, "an integer in [1, 1024] or a list of 1-3 of them (null keeps the input size)")
    for i, x in enumerate(v):
        if x is not None:
            _int(1, 1024)(path, f"{where}[{i}]", x)
    return v


_output_size.doc = "integer in [1, 1024], or a list of 1-3 of them / null"
_grid = _int(0, FULL_QMAX)  # a zero point; checked against the module's qmax below
# Bank entries / noise windows: each costs a oneDNN prepack or a pool window at load, so a count far above any
# Monte Carlo budget is refused whatever its memory (a crafted 1e5-entry bank would take minutes to build).
MAX_BANK = 4096
_count = _int(1, MAX_BANK)
_seed = _int(0, SEED_MAX)

# Module configs: field -> (check, required). A field not listed here is refused.
_QUANT_LAYER = {
    "kind": (_enum(*KINDS), True),
    "backend": (_enum(*BACKENDS), True),
    "relu": (_bool, True),
    "in_scale": (_scale, True),
    "in_zp": (_grid, False),
    "out_scale": (_scale, True),
    "out_zp": (_grid, True),
    "qmax": (_enum_int := _int(REDUCED_QMAX, FULL_QMAX), False),
    "sampler": (_sampler(), False),
    "mode": (_enum(*MODES), False),
    "bank_size": (_count, False),
    "noise_slots": (_count, False),
    "seed": (_seed, False),
    "index": (_int(0, MAX_NODES), False),
    "fresh_kernel": (_enum(*FRESH_KERNELS), False),
    "mean_scale": (_scale, False),
    "mean_zp": (_grid, False),
    "pert_scale": (_scale, False),
    "stride": (_ints(1, MAX_DIM), False),
    "padding": (_ints(0, MAX_DIM), False),
    "dilation": (_ints(1, MAX_DIM), False),
    "groups": (_int(1, MAX_DIM), False),
}
_POOL_FIELDS = {
    "kernel_size": (_ints(1, 1024, scalar=True), True),
    "stride": (_opt(_ints(1, 1024, scalar=True)), False),
    "padding": (_ints(0, 512, scalar=True), False),
    "dilation": (_ints(1, 1024, scalar=True), False),
    "ceil_mode": (_bool, False),
}
_ACT = {"scale": (_scale, True), "zero_point": (_grid, True), "qmax": (_enum_int, False)}
MODULES: dict[str, dict[str, tuple[Callable, bool]]] = {
    "QuantLayer": _QUANT_LAYER,
    "Quantize": _ACT,
    "QAdd": {"relu": (_bool, True), **_ACT},
    "DeQuantize": {},
    "QReLU": {},
    "QAdaptiveAvgPool": {"output_size": (_output_size, True)},
    "QMaxPool": {"dim": (_int(1, 3), True), **_POOL_FIELDS},
    # parameter-free torch.nn leaves that save_qbnn writes for the FP32 part of a graph (or format 1 files)
    "nn.Identity": {},
    "nn.Flatten": {"start_dim": (_int(-8, 8), False), "end_dim": (_int(-8, 8), False)},
    "nn.ReLU": {"inplace": (_bool, False)},
    "nn.Dropout": {"p": (None, False), "inplace": (_bool, False)},
    "nn.AdaptiveAvgPool2d": {"output_size": (_output_size, True)},
    **{f"nn.MaxPool{d}d": {**_POOL_FIELDS, "return_indices": (_bool, False)} for d in (1, 2, 3)},
}


def _probability(path: str, where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        fail(path, where, v, "a probability in [0, 1]")
    return float(v)


_probability.doc = "number in [0, 1]"
MODULES["nn.Dropout"]["p"] = (_probability, False)

# Operations a saved graph may hold (save_qbnn refuses anything else), with the keyword arguments each accepts.
FUNCTIONS = {
    "torch.flatten": {"start_dim", "end_dim"},
    "torch.relu": set(),
    "torch.cat": {"dim"},
    "torch.mean": {"dim", "keepdim"},
    "F.relu": {"inplace"},
    "F.adaptive_avg_pool2d": {"output_size"},
    "F.avg_pool2d": {"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"},
    "F.max_pool2d": {"kernel_size", "stride", "padding", "dilation", "ceil_mode"},
    "operator.getitem": set(),
}
METHODS = {
    "view": set(),
    "reshape": set(),
    "flatten": {"start_dim", "end_dim"},
    "contiguous": set(),
    "permute": set(),
    "transpose": set(),
    "squeeze": {"dim"},
    "unsqueeze": {"dim"},
    "size": {"dim"},
    "dim": set(),
    "relu": set(),
    "mean": {"dim", "keepdim"},
}
# How many graph values each module reads (the graph's edges against the modules).
MODULE_INPUTS = {"QAdd": 2}


def _hex(path: str, where: str, v: Any) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= 128 or any(c not in "0123456789abcdef" for c in v):
        fail(path, where, v, "a lowercase hexadecimal digest of at most 128 digits")
    return v


_hex.doc = "hexadecimal digest"

META = {
    "kind": _enum("qbnn", "qdnn"),
    "sampler": _sampler(),
    "mode": _sampler("sample", "mean"),  # format 1-2 name of the sampler
    "bank_size": _count,
    "noise_slots": _count,
    "seed": _seed,
    "backend": _enum(*BACKENDS, "fbgemm", "qnnpack"),
    "activation_qmax": _enum_int,
    "reduced_range": _bool,
    "fingerprint": _hex,
}


def identifier(path: str, where: str, v: Any, dotted: bool = False) -> str:
    """A Python identifier (dotted path when `dotted`), not a keyword, not a dunder: safe in generated code."""
    parts = v.split(".") if isinstance(v, str) and dotted else [v]
    if (
        not isinstance(v, str)
        or not 1 <= len(v) <= 200
        or not all(
            (p.isidentifier() and not keyword.iskeyword(p) and not p.startswith("__"))
            or (dotted and p.isascii() and p.isdigit() and len(p) < 7)  # a Sequential's child: layer1.0.conv1
            for p in parts
        )
    ):
        fail(
            path,
            where,
            v,
            "a Python identifier" + (" path (a.b.c)" if dotted else "") + " of letters, digits and _",
        )
    return v


def check_config(path: str, where: str, kind: str, cfg: Any, legacy: bool) -> None:
    """A module's config against MODULES[kind]: known fields only, each of its type and range."""
    fields = MODULES[kind]
    if not isinstance(cfg, dict):
        fail(path, f"{where}.config", cfg, "an object of the module's fields")
    for k, v in cfg.items():
        if legacy and k == "backend" and v in ("fbgemm", "qnnpack"):
            continue  # format 1: run on oneDNN by io._old_backends
        if k not in fields:
            fail(path, f"{where}.config", k, f"a field of {kind}: one of {sorted(fields)}")
        fields[k][0](path, f"{where}.config.{k}", v)
    for k, (_, required) in fields.items():
        if required and k not in cfg:
            fail(path, f"{where}.config.{k}", None, f"a value (a {kind} needs it)")
    qmax = cfg.get("qmax", FULL_QMAX)
    if "qmax" in cfg and qmax not in QMAXES:
        fail(path, f"{where}.config.qmax", qmax, f"one of {list(QMAXES)} (the activation grid)")
    for zp in ("zero_point", "out_zp", "in_zp"):
        if zp in cfg and cfg[zp] > qmax:
            fail(path, f"{where}.config.{zp}", cfg[zp], f"a zero point inside the activation grid 0..{qmax}")
    if kind in ("QMaxPool",) or kind.startswith("nn.MaxPool"):
        dim = cfg["dim"] if kind == "QMaxPool" else int(kind[-2])
        for k in ("kernel_size", "stride", "padding", "dilation"):
            if isinstance(cfg.get(k), list) and len(cfg[k]) != dim:
                fail(path, f"{where}.config.{k}", cfg[k], f"{dim} values (a {dim}-d pooling)")
        ks, pad = cfg["kernel_size"], cfg.get("padding", 0)
        ks, pad = ([ks] * dim if isinstance(ks, int) else ks), ([pad] * dim if isinstance(pad, int) else pad)
        if any(p > k // 2 for p, k in zip(pad, ks)):
            fail(path, f"{where}.config.padding", cfg.get("padding"), "at most half the kernel size")
        if cfg.get("return_indices"):
            fail(path, f"{where}.config.return_indices", True, "false (an INT8 graph pools values only)")


def check_quant_layer(path: str, where: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> int:
    """A QuantLayer's tensors against its config; returns the number of weights (for the memory bound)."""
    kind = cfg["kind"]
    d = 0 if kind == "linear" else int(kind[4])
    names = {
        t: tensors.get(f"{where}.{t}")
        for t in ("mu_q", "mu_scale", "sigma_q", "sigma_scale", "bias_q", "bias_sigma_q")
    }
    mu = names["mu_q"]
    if mu is None:
        fail(path, f"tensor {where}.mu_q", None, "an int8 tensor (every INT8 layer has its mean weights)")

    def need(t: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        v = names[t]
        if v is None:
            fail(path, f"tensor {where}.{t}", None, f"a {dtype} tensor of shape {list(shape)}")
        if v.dtype != dtype or tuple(v.shape) != shape:
            fail(path, f"tensor {where}.{t}", f"{v.dtype} {list(v.shape)}", f"{dtype} {list(shape)}")

    if mu.dtype != torch.int8 or mu.dim() != 2 + d or mu.numel() == 0:
        fail(
            path,
            f"tensor {where}.mu_q",
            f"{mu.dtype} {list(mu.shape)}",
            f"a non-empty int8 tensor of {2 + d} dims ({kind})",
        )
    out = mu.shape[0]
    if max(mu.shape) > MAX_DIM:
        fail(path, f"tensor {where}.mu_q", list(mu.shape), f"sizes up to {MAX_DIM}")
    need("mu_scale", torch.float32, (out,))
    for t in ("mu_scale", "sigma_scale"):
        v = names[t]
        if (
            v is not None
            and v.dtype == torch.float32
            and not bool(((v >= F32_NORMAL_MIN) & (v <= F32_MAX)).all())
        ):
            bad = v[~((v >= F32_NORMAL_MIN) & (v <= F32_MAX))][0].item()
            fail(path, f"tensor {where}.{t}", bad, "finite positive scales in float32's normal range")
    bayes = names["sigma_q"] is not None
    if bayes:
        need("sigma_q", torch.int8, tuple(mu.shape))
        if names["sigma_scale"] is None:
            fail(path, f"tensor {where}.sigma_scale", None, "a float32 tensor (sigma_q needs its scales)")
        need("sigma_scale", torch.float32, (out,))
        if bool((names["sigma_q"] < 0).any()):
            fail(path, f"tensor {where}.sigma_q", "negative values", "standard deviations >= 0")
        if "mode" not in cfg:
            fail(path, f"{where}.config.mode", None, "'sample' or 'mean' (a Bayesian layer)")
    else:
        for t in ("sigma_scale", "bias_sigma_q"):
            if names[t] is not None:
                fail(path, f"tensor {where}.{t}", "present", "absent (the layer has no sigma_q)")
    if names["bias_q"] is not None:
        need("bias_q", torch.int32, (out,))
    if names["bias_sigma_q"] is not None:
        if names["bias_q"] is None:
            fail(path, f"tensor {where}.bias_sigma_q", "present", "absent (the layer has no bias_q)")
        need("bias_sigma_q", torch.int32, (out,))
        if bool((names["bias_sigma_q"] < 0).any()):
            fail(path, f"tensor {where}.bias_sigma_q", "negative values", "standard deviations >= 0")
    if d:
        for k in ("stride", "padding", "dilation", "groups"):
            if k not in cfg:
                fail(path, f"{where}.config.{k}", None, f"a value (a {kind} layer needs it)")
        for k in ("stride", "padding", "dilation"):
            if len(cfg[k]) != d:
                fail(path, f"{where}.config.{k}", cfg[k], f"{d} values (a {kind} layer)")
        if out % cfg["groups"]:
            fail(path, f"{where}.config.groups", cfg["groups"], f"a divisor of the {out} output channels")
    else:
        for k in ("stride", "padding", "dilation", "groups"):
            if k in cfg:
                fail(path, f"{where}.config.{k}", cfg[k], "absent (a linear layer)")
    sampler = cfg.get("sampler", "fresh")
    if bayes and sampler == "flipout":
        for k in ("mean_scale", "mean_zp", "pert_scale"):
            if k not in cfg:
                fail(path, f"{where}.config.{k}", None, "a value (INT8 Flipout needs its two terms' ranges)")
    return mu.numel() if bayes else 0
