"""The schema of a `.qbdl` file, checked before any of its values is used (a model file is untrusted input).

A `.qbdl` file is safetensors (the tensors) plus one JSON document (graph, modules, meta). Every field of
that document is checked here against a declared type and range, every tensor against its module's config,
and the graph against an allowlist of operations, so that nothing from the file reaches torch.fx's code
generation, oneDNN or qbdl's C++ ops unchecked. The rules live in `schema_fields` (`MODULES`, the published
table; docs: "The .qbdl file format"), `schema_graph` and `schema_digest`; `json_schema()` gives the same rules
as a JSON Schema document.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .schema_digest import DOCUMENT, check_digests, document_digest, file_digests, tensor_digests
from .schema_fields import (
    DEFAULT_MAX_SAMPLE_BYTES,
    FORMAT_PREFIX,
    MAX_BANK,
    MAX_NODES,
    META,
    MODULES,
    ModelFileError,
    check_config,
    check_quant_layer,
    fail,
    identifier,
)
from .schema_graph import check_graph

__all__ = [
    "DOCUMENT",
    "FORMAT_PREFIX",
    "MAX_BANK",
    "MODULES",
    "ModelFileError",
    "check_digests",
    "check_file",
    "document_digest",
    "file_digests",
    "json_schema",
    "markdown_table",
    "max_sample_bytes",
    "sample_bytes",
    "tensor_digests",
]


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


def check_file(
    path: str, meta: Any, tensors: dict[str, torch.Tensor], legacy: bool, limit: int | None = None
) -> None:
    """The whole document and tensor table (meta is the parsed JSON, in place after the old-key renames)."""
    if not isinstance(meta, dict):
        fail(path, "the qbdl metadata", type(meta).__name__, "a JSON object")
    allowed = {"format", "class_name", "meta", "nodes", "modules", "digests"}
    extra = sorted(set(meta) - allowed)
    if extra:
        fail(path, "the qbdl metadata", extra, f"only the keys {sorted(allowed)}")
    identifier(path, "class_name", meta.get("class_name", "QBNN"))
    m = meta.get("meta", {})
    if not isinstance(m, dict):
        fail(path, "meta", m, "an object")
    for k, v in m.items():
        if k in META:
            META[k](path, f"meta.{k}", v)
        elif k == "kernels":
            if not isinstance(v, dict) or not all(
                isinstance(x, list) and all(isinstance(s, str) and s.isidentifier() for s in x)
                for x in v.values()
            ):
                fail(path, "meta.kernels", v, "an object of layer -> list of kernel names")
        elif k == "why":
            if not isinstance(v, list) or not all(isinstance(s, str) and len(s) < 500 for s in v):
                fail(path, "meta.why", v, "a list of short strings")
        else:
            fail(path, "meta", k, f"one of the keys {sorted([*META, 'kernels', 'why'])}")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        fail(path, "modules", type(modules).__name__, "an object of module path -> {type, config}")
    weights: dict[str, int] = {}
    for target, spec in modules.items():
        identifier(path, f"modules key {target!r:.60}", target, dotted=True)
        where = f"modules[{target!r}]"
        if not isinstance(spec, dict) or set(spec) != {"type", "config"}:
            fail(path, where, spec, "an object with type and config")
        if not isinstance(spec["type"], str) or spec["type"] not in MODULES:
            fail(path, f"{where}.type", spec["type"], f"one of the module types {sorted(MODULES)}")
        check_config(path, where, spec["type"], spec["config"], legacy)
        if spec["type"] == "QuantLayer":
            weights[target] = check_quant_layer(path, target, spec["config"], tensors)
    prefixes = {t for t, s in modules.items() if s["type"] == "QuantLayer"}
    stray = sorted(k for k in tensors if k.rsplit(".", 1)[0] not in prefixes or k.rsplit(".", 1)[-1] not in
                   ("mu_q", "mu_scale", "sigma_q", "sigma_scale", "bias_q", "bias_sigma_q"))  # fmt: skip
    if stray:
        fail(
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
