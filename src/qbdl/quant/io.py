"""Save / load a QBNN without pickling code: safetensors tensors + a JSON description of graph and modules."""

from __future__ import annotations

import json
import operator
import os
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from qbdl.atomic import atomic_write_bytes

from . import native
from .activations import DeQuantize, QAdaptiveAvgPool, QAdd, QMaxPool, QReLU, Quantize
from .backend import BACKENDS, FULL_QMAX, kernel_plan
from .conversion import attach_module
from .layers import QuantLayer, enable_prefetch
from .lower import lower
from .schema import FORMAT_PREFIX, ModelFileError, check_digests, check_file, file_digests

# 4: the JSON is checked against schema.py before use and records a SHA-256 of every tensor ("digests"). 3: the sampler is stored as "sampler" (2 and 1 store it as "sampling" in layer configs and "mode" in the model
# meta: _old_keys renames them); a new number so that a reader of 2 refuses a 3 file instead of running every
# layer as `fresh`. 2: input zero points in the layer configs, integer pooling / ReLU modules. 1 (written by the
# quantized-tensor engine, up to commit f21607b) still loads: lower() re-derives what 2 adds.
FORMAT = "qbdl-qbnn/4"
_READABLE = ("qbdl-qbnn/1", "qbdl-qbnn/2", "qbdl-qbnn/3", FORMAT)
_QMODULES = {"QuantLayer": QuantLayer, "Quantize": Quantize, "DeQuantize": DeQuantize, "QAdd": QAdd,
             "QReLU": QReLU, "QAdaptiveAvgPool": QAdaptiveAvgPool, "QMaxPool": QMaxPool}  # fmt: skip
_TENSORS = ("mu_q", "mu_scale", "sigma_q", "sigma_scale", "bias_q", "bias_sigma_q")
# call_function targets a saved graph may use (anything else is refused at save time)
_FUNCTIONS = {
    "torch.flatten": torch.flatten,
    "torch.relu": torch.relu,
    "torch.cat": torch.cat,
    "torch.mean": torch.mean,
    "F.relu": F.relu,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.avg_pool2d": F.avg_pool2d,
    "F.max_pool2d": F.max_pool2d,
    "operator.getitem": operator.getitem,
}
_FN_NAMES = {id(v): k for k, v in _FUNCTIONS.items()}


def _enc(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, slice):
        return {"slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    if isinstance(a, dict):
        return {"dict": {k: _enc(v) for k, v in a.items()}}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise TypeError(f"cannot save graph argument of type {type(a).__name__}")


def _dec(a, env: dict):
    if isinstance(a, list):
        return [_dec(x, env) for x in a]
    if isinstance(a, dict):
        if "node" in a:
            return env[a["node"]]
        if "tuple" in a:
            return tuple(_dec(x, env) for x in a["tuple"])
        if "slice" in a:
            return slice(*(_dec(x, env) for x in a["slice"]))
        return {k: _dec(v, env) for k, v in a["dict"].items()}
    return a


def _module_spec(m: nn.Module) -> dict:
    name = type(m).__name__
    if name in _QMODULES and isinstance(m, _QMODULES[name]):
        return {"type": name, "config": m.spec()}
    # Parameter-free torch.nn leaves (pooling, ReLU, flatten, dropout, identity): rebuilt from __constants__.
    if type(m).__module__.startswith("torch.nn") and getattr(nn, name, None) is type(m):
        if any(True for _ in m.parameters()) or any(b is not None for b in m.buffers()):
            raise TypeError(f"cannot save {name} with parameters in a QBNN file")
        kw = {k: getattr(m, k) for k in getattr(m, "__constants__", []) if hasattr(m, k)}
        return {"type": f"nn.{name}", "config": json.loads(json.dumps(kw))}
    raise TypeError(f"cannot save module of type {name}")


def save_qbnn(model: fx.GraphModule, path: str) -> None:
    """Write a converted QBNN/QDNN to `path` (safetensors: int8/int32 tensors + JSON metadata; no pickle)."""
    from safetensors.torch import save

    nodes, modules, tensors = [], {}, {}
    for n in model.graph.nodes:
        target = n.target
        if n.op == "call_function":
            if id(target) not in _FN_NAMES:
                raise TypeError(f"cannot save graph function {target}")
            target = _FN_NAMES[id(target)]
        elif n.op == "call_module":
            m = model.get_submodule(target)
            modules[target] = _module_spec(m)
            if isinstance(m, QuantLayer):
                for t in _TENSORS:
                    v = getattr(m, t)
                    if v is not None:
                        tensors[f"{target}.{t}"] = v.contiguous()
        elif n.op == "get_attr":
            raise TypeError("graphs with get_attr nodes cannot be saved")
        nodes.append(
            {"name": n.name, "op": n.op, "target": target, "args": _enc(n.args), "kwargs": _enc(n.kwargs)}
        )
    meta = {
        "format": FORMAT,
        "class_name": type(model).__name__,
        "meta": getattr(model, "qbdl_meta", {}),
        "nodes": nodes,
        "modules": modules,
    }
    meta = json.loads(json.dumps(meta))  # what a reader will see (tuples as lists)
    # What this writes, load_qbnn reads: the file is checked against the same schema before it exists.
    check_file(str(path), meta, tensors, legacy=False, limit=2**62)
    meta["digests"] = file_digests(meta, tensors)
    atomic_write_bytes(path, save(tensors, metadata={"qbdl": json.dumps(meta)}))


def _old_keys(meta: dict) -> None:
    """Rename the keys older files stored the sampler under (in place): layer "sampling", model meta "mode".

    Format 1's small_batch_engine (a kernel family the oneDNN engine does not have) is dropped.
    """
    for s in meta["modules"].values():
        if s.get("type") == "QuantLayer" and "sampling" in s["config"]:
            s["config"].setdefault("sampler", s["config"].pop("sampling"))
        if meta.get("format") == "qbdl-qbnn/1":
            s["config"].pop("small_batch_engine", None)  # fbgemm at batch 1: the oneDNN engine has one family
    m = meta.get("meta", {})
    if meta.get("format") == "qbdl-qbnn/1":
        m.pop("small_batch_engine", None)
    if "mode" in m:  # in the meta, "mode" always meant the sampler (a layer's own "mode" is sample/mean)
        m.setdefault("sampler", m.pop("mode"))


def _old_backends(meta: dict, path: str) -> None:
    """Files of format 1 may name the fbgemm / qnnpack engines, which ran on quantized tensors: run them on oneDNN."""
    old = {s["config"].get("backend") for s in meta["modules"].values() if s["type"] == "QuantLayer"}
    old -= set(BACKENDS)
    if not old:
        return
    warnings.warn(
        f"{path}: saved for the {sorted(old)} engine(s), which ran on PyTorch's deprecated quantized tensors; "
        "running it on oneDNN's INT8 kernels (backend x86) instead: the same int8 weights and ranges, outputs "
        "equal up to the engines' rounding of the requantization (at most 1 LSB per activation)",
        RuntimeWarning,
        stacklevel=3,
    )
    for s in meta["modules"].values():
        if s["type"] == "QuantLayer" and s["config"].get("backend") in old:
            s["config"]["backend"] = "x86"
    if meta.get("meta", {}).get("backend") in old:
        meta["meta"]["backend"] = "x86"


def _fit_activation_range(meta: dict, tensors: dict, path: str) -> None:
    """Move a model saved with full-range activations to 0..127 where this CPU's kernels need it (in place).

    Same ranges on a grid half as fine: scales x 255/127, zero points and the int32 biases (units of the input
    scale) rescaled and rounded; what the model would compute here otherwise saturates.
    """
    layers = {
        t: (s["config"]["kind"], int(s["config"].get("groups", 1)), f"{t}.sigma_q" in tensors)
        for t, s in meta["modules"].items()
        if s["type"] == "QuantLayer"
    }
    if not layers:
        return
    backend = next(s["config"]["backend"] for s in meta["modules"].values() if s["type"] == "QuantLayer")
    plan = kernel_plan(backend, layers)
    ranged = ("Quantize", "QAdd", "QuantLayer")  # the modules that produce activations (not DeQuantize)
    saved = {int(s["config"].get("qmax", FULL_QMAX)) for s in meta["modules"].values() if s["type"] in ranged}
    saved.discard(int(plan.qmax))
    if not saved or max(saved) <= plan.qmax:
        return
    old = max(saved)
    r = old / plan.qmax
    warnings.warn(
        f"{path}: saved with INT8 activations in 0..{old}, but on this CPU {'; '.join(plan.why)}: moving them to "
        f"0..{plan.qmax} (same ranges, half the resolution) so that every kernel stays exact. Re-quantize on this "
        "machine for full resolution.",
        RuntimeWarning,
        stacklevel=3,
    )
    for target, spec in meta["modules"].items():
        c = spec["config"]
        if spec["type"] in ("Quantize", "QAdd"):
            c["scale"], c["zero_point"], c["qmax"] = c["scale"] * r, round(c["zero_point"] / r), plan.qmax
        elif spec["type"] == "QuantLayer":
            c["in_scale"], c["out_scale"] = c["in_scale"] * r, c["out_scale"] * r
            c["out_zp"], c["qmax"] = round(c["out_zp"] / r), plan.qmax
            for t in ("bias_q", "bias_sigma_q"):
                if f"{target}.{t}" in tensors:
                    tensors[f"{target}.{t}"] = torch.round(tensors[f"{target}.{t}"].double() / r).to(
                        torch.int32
                    )
    meta.setdefault("meta", {}).update(plan.as_dict())


def _read(path: str) -> tuple[dict, dict]:
    """The parsed JSON document and the tensors of a `.qbdl` file, or one clear error."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"QBNN file {str(path)!r} does not exist; save one with qbdl.quant.save_qbnn")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            # each tensor in its own memory: safetensors' are views of one buffer holding the whole file, which
            # no tensor freed later (a fresh layer's int8 mu and sigma: quant/release.py) would give back
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as exc:
        raise ModelFileError(
            f"cannot load {str(path)!r} as a qbdl QBNN ({type(exc).__name__}: {exc}): the file is truncated, "
            "corrupt or not a safetensors file (e.g. a pickle renamed, which qbdl never unpickles). "
            "Re-create it with qbdl.quant.save_qbnn."
        ) from exc
    native.trim()  # the file's buffer, freed once copied: give it back to the OS now
    if "qbdl" not in header:
        raise ModelFileError(
            f"{path!r} is not a qbdl QBNN file (no qbdl metadata); save one with qbdl.quant.save_qbnn"
        )
    try:
        meta = json.loads(header["qbdl"])
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(
            f"{path!r}: its qbdl metadata is not valid JSON ({type(exc).__name__}): the file is corrupt or "
            "hand-edited. Re-create it with qbdl.quant.save_qbnn"
        ) from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt not in _READABLE:
        newer = isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX) and fmt[len(FORMAT_PREFIX) :].isdigit()
        raise ModelFileError(
            f"{path!r}: unsupported format {fmt!r:.60}; this qbdl reads {_READABLE}. "
            + (
                "The file was written by a newer qbdl: upgrade qbdl (pip install -U qbdl) to load it"
                if newer and int(fmt[len(FORMAT_PREFIX) :]) > int(FORMAT[len(FORMAT_PREFIX) :])
                else "Re-create the file with this version's qbdl.quant.save_qbnn (quantize the BNN again)"
            )
        )
    return meta, tensors


def load_qbnn(path: str, max_sample_bytes: int | None = None) -> fx.GraphModule:
    """Rebuild a QBNN/QDNN saved by save_qbnn; same seed -> same outputs (the bank is redrawn from the seed).

    The file is untrusted: its JSON is checked against qbdl.quant.schema (types, ranges, tensor shapes, the
    graph's operations) before any value is used, and the graph is built from allowlisted parts only.
    max_sample_bytes caps the memory its samplers may allocate (default QBDL_MAX_SAMPLE_BYTES or 4 GiB).
    """
    path = str(path)
    meta, tensors = _read(path)
    if not isinstance(meta.get("modules"), dict) or not all(
        isinstance(s, dict) and isinstance(s.get("config"), dict) for s in meta["modules"].values()
    ):
        raise ModelFileError(
            f"{path!r}: modules must be an object of path -> {{type, config}}; the file is corrupt"
        )
    if not isinstance(meta.get("meta", {}), dict):
        raise ModelFileError(f"{path!r}: meta must be an object; the file is corrupt")
    try:
        _old_keys(meta)
        check_file(path, meta, tensors, legacy=meta["format"] == "qbdl-qbnn/1", limit=max_sample_bytes)
        if meta["format"] == FORMAT:
            check_digests(path, meta, tensors)
    except (
        TypeError,
        KeyError,
        AttributeError,
        IndexError,
        RecursionError,
    ) as exc:  # a shape no check foresaw
        raise ModelFileError(
            f"{path!r}: its qbdl metadata is malformed ({type(exc).__name__}: {str(exc)[:200]}); the file is corrupt "
            "or crafted and qbdl refuses it before using any of its values. Re-create it with qbdl.quant.save_qbnn"
        ) from None
    meta.pop("digests", None)
    _old_backends(meta, path)
    _fit_activation_range(meta, tensors, path)
    root = nn.Module()
    for target, spec in meta["modules"].items():
        kind, cfg = spec["type"], spec["config"]
        if kind == "QuantLayer":
            kw = {t: tensors.get(f"{target}.{t}") for t in _TENSORS}
            m = QuantLayer(cfg, **kw)
        elif kind in _QMODULES:
            m = _QMODULES[kind](**cfg)
        else:  # an allowlisted parameter-free torch.nn leaf (schema.MODULES)
            m = getattr(nn, kind[3:])(**cfg)
        attach_module(root, target, m)
    graph, env = fx.Graph(), {}
    for n in meta["nodes"]:
        target = _FUNCTIONS[n["target"]] if n["op"] == "call_function" else n["target"]
        args, kwargs = _dec(n["args"], env), _dec(n["kwargs"], env)
        if n["op"] == "output":
            env[n["name"]] = graph.output(args[0])
            continue
        env[n["name"]] = graph.create_node(n["op"], target, tuple(args), kwargs, name=n["name"])
    try:
        gm = lower(fx.GraphModule(root, graph, class_name=meta.get("class_name", "QBNN")))
    except (ValueError, NotImplementedError, RuntimeError, KeyError, AttributeError) as exc:
        raise ModelFileError(
            f"{path!r}: its graph does not form an INT8 network qbdl can run ({type(exc).__name__}: {exc}). The "
            "file is corrupt or hand-edited; re-create it with qbdl.quant.save_qbnn"
        ) from None
    gm.eval()
    gm.qbdl_meta = meta.get("meta", {})
    return enable_prefetch(gm)
