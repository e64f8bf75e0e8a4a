"""The exported model's metadata (JSON in the ONNX file's metadata_props): written by the export, validated on load.

Imports no torch and no onnx: `python -m qbdl.predict` reads it with numpy only. The metadata is untrusted on
load: every field is checked for type and range, unknown keys are refused, and nothing from it is used as a
path, a module name or code (class names are only printed and written as CSV/JSON cells).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

FORMAT = "qbdl-onnx/1"
KEY = "qbdl"
SCORES = ("entropy", "mi", "maxprob")
MAX_CLASSES = 100_000
MAX_NAME = 200
MAX_BYTES = 16 << 20  # metadata larger than this is refused


class MetadataError(ValueError):
    """The model file's qbdl metadata is missing, malformed or out of range."""


def _fail(path: str, key: str, got: Any, want: str) -> None:
    shown = repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise MetadataError(
        f"{path}: metadata field {key} is {shown}, expected {want}. The file is corrupt, hand-edited or not made "
        "by `python -m qbdl.export`; nothing of it was used. Export the model again."
    )


def _num(path: str, key: str, v: Any, lo: float, hi: float, integer: bool = False) -> float:
    ok = isinstance(v, int) and not isinstance(v, bool) if integer else (
        isinstance(v, (int, float)) and not isinstance(v, bool))  # fmt: skip
    if not ok or not math.isfinite(float(v)) or not lo <= v <= hi:
        _fail(path, key, v, f"{'an integer' if integer else 'a number'} in [{lo}, {hi}]")
    return v


def _text(path: str, key: str, v: Any, max_len: int = MAX_NAME) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= max_len or not v.isprintable():
        _fail(path, key, v, f"printable text of 1..{max_len} characters")
    return v


def _keys(path: str, where: str, d: Any, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(d, dict):
        _fail(path, where, d, "an object")
    missing, extra = required - set(d), set(d) - required - set(optional)
    if missing:
        _fail(
            path, where, sorted(d), f"an object with the keys {sorted(required)} (missing {sorted(missing)})"
        )
    if extra:
        _fail(
            path, where, sorted(d), f"no keys beyond {sorted(required | set(optional))} (got {sorted(extra)})"
        )
    return d


_PRE = {
    "mode",
    "source_size",
    "resize",
    "resize_mode",
    "crop",
    "interpolation",
    "scale",
    "mean",
    "std",
    "image_size",
}
_TOP = {"format", "kind", "qbdl_version", "classes", "preprocessing", "mc_samples", "perturbations", "noise",
        "referral", "source", "activation_qmax", "outputs"}  # fmt: skip


def validate(meta: Any, path: str = "model") -> dict:
    """Check every field of the metadata (types, ranges, no unknown keys); returns it unchanged or raises."""
    m = _keys(path, "(top level)", meta, _TOP, {"sampling"})
    if m["format"] != FORMAT:
        _fail(path, "format", m["format"], f"{FORMAT!r} (this qbdl reads that format only)")
    if m["kind"] not in ("qbnn", "qdnn"):
        _fail(path, "kind", m["kind"], "'qbnn' or 'qdnn'")
    _text(path, "qbdl_version", m["qbdl_version"], 40)
    classes = m["classes"]
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
        _fail(path, "classes", classes, f"a list of 2..{MAX_CLASSES} class names")
    for i, c in enumerate(classes):
        _text(path, f"classes[{i}]", c)
    if len(set(classes)) != len(classes):
        _fail(path, "classes", classes, "distinct class names")
    p = _keys(path, "preprocessing", m["preprocessing"], _PRE)
    if p["mode"] not in ("L", "RGB"):
        _fail(path, "preprocessing.mode", p["mode"], "'L' or 'RGB'")
    chans = 1 if p["mode"] == "L" else 3
    if p["source_size"] is not None:
        ss = p["source_size"]
        if not isinstance(ss, list) or len(ss) != 2:
            _fail(path, "preprocessing.source_size", ss, "null or [height, width]")
        for i, v in enumerate(ss):
            _num(path, f"preprocessing.source_size[{i}]", v, 1, 65536, integer=True)
    _num(path, "preprocessing.image_size", p["image_size"], 1, 8192, integer=True)
    _num(path, "preprocessing.resize", p["resize"], 1, 8192, integer=True)
    if p["resize_mode"] not in ("square", "shorter"):
        _fail(path, "preprocessing.resize_mode", p["resize_mode"], "'square' or 'shorter'")
    if p["crop"] is not None:
        _num(path, "preprocessing.crop", p["crop"], 1, 8192, integer=True)
        if p["crop"] != p["image_size"] or p["crop"] > p["resize"]:
            _fail(path, "preprocessing.crop", p["crop"], "the image size, at most the resize")
    elif p["resize_mode"] != "square" or p["resize"] != p["image_size"]:
        _fail(
            path, "preprocessing.resize", p["resize"], "the image size when there is no crop (square resize)"
        )
    if p["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        _fail(path, "preprocessing.interpolation", p["interpolation"], "'bilinear', 'bicubic' or 'nearest'")
    _num(path, "preprocessing.scale", p["scale"], 1e-6, 1.0)
    for key in ("mean", "std"):
        v = p[key]
        if not isinstance(v, list) or len(v) != chans:
            _fail(
                path,
                f"preprocessing.{key}",
                v,
                f"a list of {chans} numbers (one per channel of mode {p['mode']})",
            )
        for i, x in enumerate(v):
            _num(path, f"preprocessing.{key}[{i}]", x, 1e-6 if key == "std" else -1e3, 1e3)
    _num(path, "mc_samples", m["mc_samples"], 1, 4096, integer=True)
    _num(path, "perturbations", m["perturbations"], 0, 4096, integer=True)
    if m["noise"] not in ("seed", "input", "none"):
        _fail(path, "noise", m["noise"], "'seed', 'input' or 'none'")
    if (m["kind"] == "qdnn") != (m["noise"] == "none") or (m["kind"] == "qdnn" and m["mc_samples"] != 1):
        _fail(path, "noise", m["noise"], "'none' with mc_samples 1 exactly for a qdnn")
    # a QBNN's weight sampling: 'flipout' (the default of files without the key) or 'bank' (perturbations = K)
    if m.get("sampling", "flipout") not in ("flipout", "bank") or ("sampling" in m and m["kind"] != "qbnn"):
        _fail(path, "sampling", m.get("sampling"), "'flipout' or 'bank', for a qbnn only")
    r = _keys(path, "referral", m["referral"], {"score", "threshold", "target_accuracy", "fitted_on"},
              {"val_accuracy_kept", "val_referred"})  # fmt: skip
    if r["score"] not in SCORES:
        _fail(path, "referral.score", r["score"], f"one of {SCORES}")
    if r["threshold"] is not None:
        _num(path, "referral.threshold", r["threshold"], -1.0, 1e3)
    _num(path, "referral.target_accuracy", r["target_accuracy"], 0.0, 1.0)
    if r["fitted_on"] is not None:
        _text(path, "referral.fitted_on", r["fitted_on"], 80)
    for k in ("val_accuracy_kept", "val_referred"):
        if r.get(k) is not None:
            _num(path, f"referral.{k}", r[k], 0.0, 1.0)
    s = _keys(path, "source", m["source"], {"fingerprint", "file"})
    if s["fingerprint"] is not None:
        fp = s["fingerprint"]
        if not isinstance(fp, str) or not 8 <= len(fp) <= 128 or any(c not in "0123456789abcdef" for c in fp):
            _fail(path, "source.fingerprint", fp, "null or a lower-case hex digest")
    _text(path, "source.file", s["file"], 200)
    _num(path, "activation_qmax", m["activation_qmax"], 1, 255, integer=True)
    outs = m["outputs"]
    if not isinstance(outs, list) or not {"probs", "entropy", "mi"} <= set(outs) or not set(outs) <= {
        "probs", "entropy", "mi", "logits"}:  # fmt: skip
        _fail(path, "outputs", outs, "the names probs, entropy, mi (and logits)")
    return m


def dumps(meta: dict) -> str:
    """The metadata as the JSON string stored in the file (validated first: the export never writes a bad one)."""
    validate(meta, "metadata being exported")
    return json.dumps(meta, sort_keys=True)


def loads(text: str | bytes, path: str = "model") -> dict:
    """Parse and validate the stored JSON string."""
    if len(text) > MAX_BYTES:
        raise MetadataError(
            f"{path}: its qbdl metadata is {len(text)} bytes (at most {MAX_BYTES}); refusing it"
        )
    try:
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetadataError(f"{path}: its qbdl metadata is not JSON ({exc}); export the model again") from exc
    return validate(meta, path)


# -- reading metadata_props from an ONNX file without the onnx package (protobuf wire format)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise MetadataError("truncated or malformed ONNX file (bad varint)")
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message: value bytes for length-delimited fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _varint(buf, i)
        elif wire == 1:
            v, i = buf[i : i + 8], i + 8
        elif wire == 5:
            v, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise MetadataError("truncated or malformed ONNX file (field runs past the end)")
            v, i = buf[i : i + n], i + n
        else:
            raise MetadataError(f"malformed ONNX file (protobuf wire type {wire})")
        yield field, wire, v


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The validated qbdl metadata of an exported .onnx file (ModelProto.metadata_props, field 14)."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as exc:
        raise MetadataError(f"cannot read model file {path!r}: {exc.strerror or exc}") from exc
    try:
        for field, wire, v in _fields(buf):
            if field == 14 and wire == 2:
                entry = {k: bytes(x) for k, w, x in _fields(v) if w == 2}
                if entry.get(1) == KEY.encode():
                    return loads(entry.get(2, b""), path)
    except MetadataError as exc:
        if path in str(exc):
            raise
        raise MetadataError(
            f"{path}: {exc}; it is not an ONNX model written by `python -m qbdl.export`"
        ) from exc
    raise MetadataError(
        f"{path}: no qbdl metadata in this ONNX file: it was not written by `python -m qbdl.export` (which "
        "stores classes, preprocessing and the referral threshold there); export the model with it"
    )


def fit_threshold(scores: list[float], correct: list[bool], target: float) -> tuple[float, float, float]:
    """(threshold, accuracy kept, share referred): refer score > threshold, the largest kept set reaching target.

    Scores tie-aware: a threshold keeps every image with a score at or below it. Target unreachable even on the
    most certain image alone: threshold -1 (refer everything; scores are >= 0).
    """
    pairs = sorted(zip(scores, correct))
    n = len(pairs)
    if n == 0:
        raise ValueError("fit_threshold needs at least one validation prediction")
    best = (-1.0, 0.0, 1.0)
    right = 0
    for k, (s, c) in enumerate(pairs, start=1):
        right += bool(c)
        if k < n and pairs[k][0] == s:  # not a cut point: the next image has the same score
            continue
        if right / k >= target:
            best = (float(s), right / k, 1.0 - k / n)
    return best
