"""SHA-256 digests of a `.qbdl` file's tensors and JSON document: what save_qbnn records and load_qbnn checks."""

from __future__ import annotations

import hashlib
import json

import torch

from .schema_fields import fail


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
        fail(path, "digests", type(recorded).__name__, "an object of tensor name -> SHA-256")
    if recorded.get(DOCUMENT) != document_digest(meta):
        fail(
            path,
            "the JSON document",
            "content that does not match its recorded SHA-256",
            "the document save_qbnn wrote (a field was edited)",
        )
    recorded = {k: v for k, v in recorded.items() if k != DOCUMENT}
    got = tensor_digests(tensors)
    if set(got) != set(recorded):
        missing, extra = sorted(set(recorded) - set(got)), sorted(set(got) - set(recorded))
        fail(
            path,
            "the tensor table",
            {"missing": missing[:3], "unrecorded": extra[:3]},
            "the tensors save_qbnn recorded",
        )
    bad = [k for k in got if got[k] != recorded[k]]
    if bad:
        fail(
            path,
            f"tensor {bad[0]}",
            "content that does not match its recorded SHA-256",
            "the bytes save_qbnn wrote (a tensor changed, moved or swapped)",
        )
