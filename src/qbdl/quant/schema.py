"""The schema of a `.qbdl` file, checked before any of its values is used (a model file is untrusted input).

A `.qbdl` file is safetensors (the tensors) plus one JSON document (graph, modules, meta). Every field of
that document is checked here against a declared type and range, every tensor against its module's config,
and the graph against an allowlist of operations, so that nothing from the file reaches torch.fx's code
generation, oneDNN or qbdl's C++ ops unchecked. `MODULES` below is the published table (docs:
"The .qbdl file format"); `json_schema()` gives the same rules as a JSON Schema document.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from ..bayes.layers import MODES
from .backend import BACKENDS, FULL_QMAX, REDUCED_QMAX
from .layers import FRESH_KERNELS, KINDS, SAMPLERS

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


def _fail(path: str, where: str, got: Any, expected: str) -> None:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ModelFileError(
        f"{path}: {where} is {shown}, expected {expected}. The file is corrupt, hand-edited or crafted: qbdl "
        "refuses it before using any of its values. Re-create it with qbdl.quant.save_qbnn from the run that "
        "made it (or quantize the BNN again)"
    )


# -- field types: each returns the (normalised) value or calls _fail


def _int(lo: int, hi: int) -> Callable:
    def check(path: str, where: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            _fail(path, where, v, f"an integer in [{lo}, {hi}]")
        return v

    check.doc = f"integer in [{lo}, {hi}]"
    return check


def _scale(path: str, where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(path, where, v, "a finite positive number (a quantization scale)")
    if not F32_NORMAL_MIN <= v <= F32_MAX:
        _fail(path, where, v, f"a scale in float32's normal range [{F32_NORMAL_MIN:.3g}, {F32_MAX:.3g}]")
    return float(v)


_scale.doc = "finite float in float32's normal range (> 0)"


def _bool(path: str, where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        _fail(path, where, v, "true or false")
    return v


_bool.doc = "boolean"


def _enum(*names: str) -> Callable:
    def check(path: str, where: str, v: Any) -> str:
        if v not in names or not isinstance(v, str):
            _fail(path, where, v, f"one of {list(names)}")
        return v

    check.doc = "one of " + ", ".join(names)
    return check


def _ints(lo: int, hi: int, n: int | None = None, scalar: bool = False) -> Callable:
    """A list of integers in [lo, hi] (length n when given; a single integer too when `scalar`)."""

    def check(path: str, where: str, v: Any) -> Any:
        if scalar and isinstance(v, int) and not isinstance(v, bool):
            return _int(lo, hi)(path, where, v)
        if not isinstance(v, list) or (n is not None and len(v) != n) or not 1 <= len(v) <= 3:
            _fail(
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
        _fail(path, where, v, "an integer in [1, 1024] or a list of 1-3 of them (null keeps the input size)")
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
    "sampler": (_enum(*SAMPLERS), False),
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
        _fail(path, where, v, "a probability in [0, 1]")
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
        _fail(path, where, v, "a lowercase hexadecimal digest of at most 128 digits")
    return v


_hex.doc = "hexadecimal digest"

META = {
    "kind": _enum("qbnn", "qdnn"),
    "sampler": _enum(*SAMPLERS),
    "mode": _enum(*SAMPLERS, "sample", "mean"),  # format 1-2 name of the sampler
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
        _fail(
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
        _fail(path, f"{where}.config", cfg, "an object of the module's fields")
    for k, v in cfg.items():
        if legacy and k == "backend" and v in ("fbgemm", "qnnpack"):
            continue  # format 1: run on oneDNN by io._old_backends
        if k not in fields:
            _fail(path, f"{where}.config", k, f"a field of {kind}: one of {sorted(fields)}")
        fields[k][0](path, f"{where}.config.{k}", v)
    for k, (_, required) in fields.items():
        if required and k not in cfg:
            _fail(path, f"{where}.config.{k}", None, f"a value (a {kind} needs it)")
    qmax = cfg.get("qmax", FULL_QMAX)
    if "qmax" in cfg and qmax not in QMAXES:
        _fail(path, f"{where}.config.qmax", qmax, f"one of {list(QMAXES)} (the activation grid)")
    for zp in ("zero_point", "out_zp", "in_zp"):
        if zp in cfg and cfg[zp] > qmax:
            _fail(path, f"{where}.config.{zp}", cfg[zp], f"a zero point inside the activation grid 0..{qmax}")
    if kind in ("QMaxPool",) or kind.startswith("nn.MaxPool"):
        dim = cfg["dim"] if kind == "QMaxPool" else int(kind[-2])
        for k in ("kernel_size", "stride", "padding", "dilation"):
            if isinstance(cfg.get(k), list) and len(cfg[k]) != dim:
                _fail(path, f"{where}.config.{k}", cfg[k], f"{dim} values (a {dim}-d pooling)")
        ks, pad = cfg["kernel_size"], cfg.get("padding", 0)
        ks, pad = ([ks] * dim if isinstance(ks, int) else ks), ([pad] * dim if isinstance(pad, int) else pad)
        if any(p > k // 2 for p, k in zip(pad, ks)):
            _fail(path, f"{where}.config.padding", cfg.get("padding"), "at most half the kernel size")
        if cfg.get("return_indices"):
            _fail(path, f"{where}.config.return_indices", True, "false (an INT8 graph pools values only)")


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
        _fail(path, f"tensor {where}.mu_q", None, "an int8 tensor (every INT8 layer has its mean weights)")

    def need(t: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        v = names[t]
        if v is None:
            _fail(path, f"tensor {where}.{t}", None, f"a {dtype} tensor of shape {list(shape)}")
        if v.dtype != dtype or tuple(v.shape) != shape:
            _fail(path, f"tensor {where}.{t}", f"{v.dtype} {list(v.shape)}", f"{dtype} {list(shape)}")

    if mu.dtype != torch.int8 or mu.dim() != 2 + d or mu.numel() == 0:
        _fail(
            path,
            f"tensor {where}.mu_q",
            f"{mu.dtype} {list(mu.shape)}",
            f"a non-empty int8 tensor of {2 + d} dims ({kind})",
        )
    out = mu.shape[0]
    if max(mu.shape) > MAX_DIM:
        _fail(path, f"tensor {where}.mu_q", list(mu.shape), f"sizes up to {MAX_DIM}")
    need("mu_scale", torch.float32, (out,))
    for t in ("mu_scale", "sigma_scale"):
        v = names[t]
        if (
            v is not None
            and v.dtype == torch.float32
            and not bool(((v >= F32_NORMAL_MIN) & (v <= F32_MAX)).all())
        ):
            bad = v[~((v >= F32_NORMAL_MIN) & (v <= F32_MAX))][0].item()
            _fail(path, f"tensor {where}.{t}", bad, "finite positive scales in float32's normal range")
    bayes = names["sigma_q"] is not None
    if bayes:
        need("sigma_q", torch.int8, tuple(mu.shape))
        if names["sigma_scale"] is None:
            _fail(path, f"tensor {where}.sigma_scale", None, "a float32 tensor (sigma_q needs its scales)")
        need("sigma_scale", torch.float32, (out,))
        if bool((names["sigma_q"] < 0).any()):
            _fail(path, f"tensor {where}.sigma_q", "negative values", "standard deviations >= 0")
        if "mode" not in cfg:
            _fail(path, f"{where}.config.mode", None, "'sample' or 'mean' (a Bayesian layer)")
    else:
        for t in ("sigma_scale", "bias_sigma_q"):
            if names[t] is not None:
                _fail(path, f"tensor {where}.{t}", "present", "absent (the layer has no sigma_q)")
    if names["bias_q"] is not None:
        need("bias_q", torch.int32, (out,))
    if names["bias_sigma_q"] is not None:
        if names["bias_q"] is None:
            _fail(path, f"tensor {where}.bias_sigma_q", "present", "absent (the layer has no bias_q)")
        need("bias_sigma_q", torch.int32, (out,))
        if bool((names["bias_sigma_q"] < 0).any()):
            _fail(path, f"tensor {where}.bias_sigma_q", "negative values", "standard deviations >= 0")
    if d:
        for k in ("stride", "padding", "dilation", "groups"):
            if k not in cfg:
                _fail(path, f"{where}.config.{k}", None, f"a value (a {kind} layer needs it)")
        for k in ("stride", "padding", "dilation"):
            if len(cfg[k]) != d:
                _fail(path, f"{where}.config.{k}", cfg[k], f"{d} values (a {kind} layer)")
        if out % cfg["groups"]:
            _fail(path, f"{where}.config.groups", cfg["groups"], f"a divisor of the {out} output channels")
    else:
        for k in ("stride", "padding", "dilation", "groups"):
            if k in cfg:
                _fail(path, f"{where}.config.{k}", cfg[k], "absent (a linear layer)")
    sampler = cfg.get("sampler", "fresh")
    if bayes and sampler == "flipout":
        for k in ("mean_scale", "mean_zp", "pert_scale"):
            if k not in cfg:
                _fail(path, f"{where}.config.{k}", None, "a value (INT8 Flipout needs its two terms' ranges)")
    return mu.numel() if bayes else 0


def sample_bytes(meta: dict) -> int:
    """Bytes the layers' samplers will hold for this file's sampled weights (bank, flipout, fresh operands)."""
    total = 0
    for target, spec in meta["modules"].items():
        if spec["type"] != "QuantLayer":
            continue
        c, n = spec["config"], meta["_weights"].get(target, 0)
        sampler = c.get("sampler", "fresh")
        if sampler in ("bank", "flipout"):
            total += (1 + c.get("bank_size", 16)) * n  # K packed entries (+ int8 working copies while built)
            if sampler == "bank" and "noise_slots" in c:  # a pool-era bank regenerates its K windows (int16)
                total += 2 * n * c.get("bank_size", 16)
        else:
            total += 7 * n  # the packed sample, int16 operands and channel slots (noise is generated)
    return total


def max_sample_bytes(override: int | None = None) -> int:
    """The limit on sampled-weight memory: the argument, else QBDL_MAX_SAMPLE_BYTES, else 4 GiB."""
    if override is not None:
        return int(override)
    env = os.environ.get("QBDL_MAX_SAMPLE_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"QBDL_MAX_SAMPLE_BYTES={env!r} is not a number of bytes (e.g. 8e9)") from None
    return DEFAULT_MAX_SAMPLE_BYTES


def _check_arg(path: str, where: str, a: Any, defined: set[str], depth: int = 0) -> None:
    """A graph argument: a literal (no strings), a reference to an earlier node, or a tuple/list/slice of them."""
    if depth > MAX_NESTING:
        _fail(path, where, "...", f"arguments nested at most {MAX_NESTING} deep")
    if a is None or isinstance(a, bool):
        return
    if isinstance(a, int):
        if abs(a) > 2**31:
            _fail(path, where, a, "an integer argument of magnitude <= 2^31")
        return
    if isinstance(a, float):
        if not math.isfinite(a):
            _fail(path, where, a, "a finite number")
        return
    if isinstance(a, list):
        for i, x in enumerate(a):
            _check_arg(path, f"{where}[{i}]", x, defined, depth + 1)
        return
    if isinstance(a, dict) and len(a) == 1:
        ((tag, v),) = a.items()
        if tag == "node":
            if not isinstance(v, str) or v not in defined:
                _fail(path, where, v, "the name of an earlier node of the graph")
            return
        if tag in ("tuple", "slice") and isinstance(v, list) and (tag == "tuple" or len(v) == 3):
            for i, x in enumerate(v):
                _check_arg(path, f"{where}.{tag}[{i}]", x, defined, depth + 1)
            return
    _fail(
        path,
        where,
        a,
        "a number, true/false, null, {'node': NAME}, {'tuple': [...]}, a list or {'slice': [a, b, c]}",
    )


def _kwargs(path: str, where: str, kw: Any, allowed: set[str], defined: set[str]) -> None:
    if not (isinstance(kw, dict) and list(kw) == ["dict"] and isinstance(kw["dict"], dict)):
        _fail(path, where, kw, "{'dict': {NAME: value}}")
    for k, v in kw["dict"].items():
        if k not in allowed:
            _fail(
                path,
                f"{where}.{k!s:.40}",
                k,
                f"a keyword argument of this operation: one of {sorted(allowed) or 'none'}",
            )
        _check_arg(path, f"{where}.{k}", v, defined, 1)


def check_graph(path: str, nodes: Any, modules: dict) -> None:
    """The graph: allowlisted ops and targets, identifiers only, every edge to an earlier node, one output."""
    if not isinstance(nodes, list) or not 2 <= len(nodes) <= MAX_NODES:
        _fail(path, "nodes", type(nodes).__name__, f"a list of 2..{MAX_NODES} graph nodes")
    defined: set[str] = set()
    used_modules: set[str] = set()
    seen_compute = False
    for i, n in enumerate(nodes):
        where = f"nodes[{i}]"
        if not isinstance(n, dict) or set(n) != {"name", "op", "target", "args", "kwargs"}:
            _fail(
                path,
                where,
                n if not isinstance(n, dict) else sorted(n),
                "an object with name, op, target, args, kwargs",
            )
        name, op, target, args = n["name"], n["op"], n["target"], n["args"]
        identifier(path, f"{where}.name", name)
        if name in defined:
            _fail(path, f"{where}.name", name, "a name no earlier node has")
        if not (isinstance(args, dict) and list(args) == ["tuple"] and isinstance(args["tuple"], list)):
            _fail(path, f"{where}.args", args, "{'tuple': [...]}")
        args = args["tuple"]
        last = i == len(nodes) - 1
        if op == "placeholder":
            if seen_compute:
                _fail(path, f"{where}.op", op, "inputs (placeholders) before every other node")
            identifier(path, f"{where}.target", target)
            if args or n["kwargs"] != {"dict": {}}:
                _fail(path, f"{where}.args", n["args"], "no arguments (an input has no default value)")
        elif op == "output":
            if not last or target != "output" or len(args) != 1 or n["kwargs"] != {"dict": {}}:
                _fail(path, where, {"op": op, "target": target}, "one output node, last, with one value")
            _check_arg(path, f"{where}.args", args, defined)
        elif op in ("call_module", "call_function", "call_method"):
            seen_compute = True
            if last:
                _fail(path, where, op, "the output node last")
            if op == "call_module":
                if not isinstance(target, str) or target not in modules:
                    _fail(path, f"{where}.target", target, "a module listed in the file's modules")
                used_modules.add(target)
                allowed: set[str] = set()
                n_in = MODULE_INPUTS.get(modules[target]["type"], 1)
                if len(args) != n_in or not all(isinstance(a, dict) and list(a) == ["node"] for a in args):
                    _fail(
                        path,
                        f"{where}.args",
                        n["args"],
                        f"{n_in} graph value(s): a {modules[target]['type']} reads {n_in}",
                    )
            elif op == "call_function":
                if not isinstance(target, str) or target not in FUNCTIONS:
                    _fail(
                        path,
                        f"{where}.target",
                        target,
                        f"one of the functions save_qbnn writes: {sorted(FUNCTIONS)}",
                    )
                allowed = FUNCTIONS[target]
            else:
                if not isinstance(target, str) or target not in METHODS:
                    _fail(
                        path,
                        f"{where}.target",
                        target,
                        f"one of the tensor methods save_qbnn writes: {sorted(METHODS)}",
                    )
                allowed = METHODS[target]
                if not args or not (isinstance(args[0], dict) and list(args[0]) == ["node"]):
                    _fail(path, f"{where}.args", n["args"], "the tensor the method is called on first")
            _check_arg(path, f"{where}.args", args, defined)
            _kwargs(path, f"{where}.kwargs", n["kwargs"], allowed, defined)
        else:
            _fail(
                path,
                f"{where}.op",
                op,
                "placeholder, call_module, call_function, call_method or output (get_attr and others are never written)",
            )
        defined.add(name)
    if nodes[-1].get("op") != "output":
        _fail(path, f"nodes[{len(nodes) - 1}].op", nodes[-1].get("op"), "output (the last node)")
    unused = sorted(set(modules) - used_modules)
    if unused:
        _fail(path, "modules", unused[:3], "only modules the graph calls")


def check_file(
    path: str, meta: Any, tensors: dict[str, torch.Tensor], legacy: bool, limit: int | None = None
) -> None:
    """The whole document and tensor table (meta is the parsed JSON, in place after the old-key renames)."""
    if not isinstance(meta, dict):
        _fail(path, "the qbdl metadata", type(meta).__name__, "a JSON object")
    allowed = {"format", "class_name", "meta", "nodes", "modules", "digests"}
    extra = sorted(set(meta) - allowed)
    if extra:
        _fail(path, "the qbdl metadata", extra, f"only the keys {sorted(allowed)}")
    identifier(path, "class_name", meta.get("class_name", "QBNN"))
    m = meta.get("meta", {})
    if not isinstance(m, dict):
        _fail(path, "meta", m, "an object")
    for k, v in m.items():
        if k in META:
            META[k](path, f"meta.{k}", v)
        elif k == "kernels":
            if not isinstance(v, dict) or not all(
                isinstance(x, list) and all(isinstance(s, str) and s.isidentifier() for s in x)
                for x in v.values()
            ):
                _fail(path, "meta.kernels", v, "an object of layer -> list of kernel names")
        elif k == "why":
            if not isinstance(v, list) or not all(isinstance(s, str) and len(s) < 500 for s in v):
                _fail(path, "meta.why", v, "a list of short strings")
        else:
            _fail(path, "meta", k, f"one of the keys {sorted([*META, 'kernels', 'why'])}")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        _fail(path, "modules", type(modules).__name__, "an object of module path -> {type, config}")
    weights: dict[str, int] = {}
    for target, spec in modules.items():
        identifier(path, f"modules key {target!r:.60}", target, dotted=True)
        where = f"modules[{target!r}]"
        if not isinstance(spec, dict) or set(spec) != {"type", "config"}:
            _fail(path, where, spec, "an object with type and config")
        if not isinstance(spec["type"], str) or spec["type"] not in MODULES:
            _fail(path, f"{where}.type", spec["type"], f"one of the module types {sorted(MODULES)}")
        check_config(path, where, spec["type"], spec["config"], legacy)
        if spec["type"] == "QuantLayer":
            weights[target] = check_quant_layer(path, target, spec["config"], tensors)
    prefixes = {t for t, s in modules.items() if s["type"] == "QuantLayer"}
    stray = sorted(k for k in tensors if k.rsplit(".", 1)[0] not in prefixes or k.rsplit(".", 1)[-1] not in
                   ("mu_q", "mu_scale", "sigma_q", "sigma_scale", "bias_q", "bias_sigma_q"))  # fmt: skip
    if stray:
        _fail(
            path,
            "the tensor table",
            stray[:3],
            "only tensors of the file's INT8 layers (mu_q, mu_scale, ...)",
        )
    check_graph(path, meta.get("nodes"), modules)
    meta["_weights"] = weights
    need, cap = sample_bytes(meta), max_sample_bytes(limit)
    del meta["_weights"]
    if need > cap:
        raise ModelFileError(
            f"{path}: its samplers' bank_size / noise_slots ask for {need / 2**30:.2f} GiB of sampled weights, "
            f"over the limit of {cap / 2**30:.2f} GiB. A crafted or corrupt file asks for this to exhaust memory; "
            "if the file is yours and the machine has the memory, raise the limit with "
            "load_qbnn(path, max_sample_bytes=N) or the environment variable QBDL_MAX_SAMPLE_BYTES=N"
        )


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of each tensor's name, dtype, shape and bytes (a tensor moved or swapped between layers fails)."""
    out = {}
    for k in sorted(tensors):
        v = tensors[k].contiguous()
        h = hashlib.sha256(f"{k}|{v.dtype}|{list(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        out[k] = h.hexdigest()
    return out


DOCUMENT = "qbdl:document"  # the digests' entry for the JSON document itself


def document_digest(meta: dict) -> str:
    """SHA-256 of the JSON document's content (class name, meta, graph, modules), canonically serialised."""
    doc = {k: meta.get(k) for k in ("class_name", "meta", "nodes", "modules")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def file_digests(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """What save_qbnn records: a SHA-256 per tensor and one of the JSON document."""
    return {**tensor_digests(tensors), DOCUMENT: document_digest(meta)}


def check_digests(path: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The file against the digests save_qbnn recorded (an edited field, a changed or swapped tensor fails).

    Not a signature: whoever edits a file can recompute them; the schema is what keeps a crafted file out of
    native code. The digests catch corruption and edits made without qbdl's writer.
    """
    recorded = meta.get("digests")
    if not isinstance(recorded, dict):
        _fail(path, "digests", type(recorded).__name__, "an object of tensor name -> SHA-256")
    if recorded.get(DOCUMENT) != document_digest(meta):
        _fail(
            path,
            "the JSON document",
            "content that does not match its recorded SHA-256",
            "the document save_qbnn wrote (a field was edited)",
        )
    recorded = {k: v for k, v in recorded.items() if k != DOCUMENT}
    got = tensor_digests(tensors)
    if set(got) != set(recorded):
        missing, extra = sorted(set(recorded) - set(got)), sorted(set(got) - set(recorded))
        _fail(
            path,
            "the tensor table",
            {"missing": missing[:3], "unrecorded": extra[:3]},
            "the tensors save_qbnn recorded",
        )
    bad = [k for k in got if got[k] != recorded[k]]
    if bad:
        _fail(
            path,
            f"tensor {bad[0]}",
            "content that does not match its recorded SHA-256",
            "the bytes save_qbnn wrote (a tensor changed, moved or swapped)",
        )


def json_schema() -> dict:
    """The module configs as a JSON Schema document (types, ranges and enums as far as JSON Schema says them)."""
    defs = {}
    for kind, fields in MODULES.items():
        props = {k: {"description": getattr(chk, "doc", "")} for k, (chk, _) in fields.items()}
        defs[kind] = {
            "type": "object",
            "properties": props,
            "required": [k for k, (_, r) in fields.items() if r],
            "additionalProperties": False,
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "qbdl .qbdl model file (the JSON document in the safetensors metadata key 'qbdl')",
        "type": "object",
        "required": ["format", "nodes", "modules"],
        "properties": {
            "format": {"type": "string", "pattern": "^qbdl-qbnn/[0-9]+$"},
            "class_name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
            "nodes": {"type": "array", "maxItems": MAX_NODES},
            "modules": {"type": "object"},
            "digests": {
                "type": "object",
                "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            },
        },
        "$defs": defs,
    }


def markdown_table() -> str:
    """The module table of the file format as Markdown (docs/model-file.md holds this, checked by a test)."""
    rows = ["| module type | field | required | type and range |", "|---|---|---|---|"]
    for kind, fields in MODULES.items():
        if not fields:
            rows.append(f"| `{kind}` | (none) | | |")
        for k, (chk, req) in fields.items():
            rows.append(f"| `{kind}` | `{k}` | {'yes' if req else 'no'} | {getattr(chk, 'doc', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m qbdl.quant.schema [--json]: print the published schema
    import sys

    print(json.dumps(json_schema(), indent=2) if "--json" in sys.argv else markdown_table())
