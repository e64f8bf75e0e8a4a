"""Deploy qbdl's INT8 models: ONNX export (QDQ INT8, Monte Carlo sampling in the graph: per-example INT8 Flipout or
a bank of INT8 networks), ONNX Runtime / OpenVINO.

`python -m qbdl.export RUN_DIR_or_QBDL --format onnx` writes qbnn.onnx / qdnn.onnx; `python -m qbdl.predict`
runs them without torch. Importing this package imports no torch: the exporter (which needs it) loads on first
use of export_run / export_file / export_model / build_onnx.
"""

from __future__ import annotations

from typing import Any

from .metadata import FORMAT, MetadataError, read_onnx_metadata, validate
from .runtime import RUNTIMES, ImageError, Model, preprocess

_LAZY = {
    "export_run": "core",
    "export_file": "core",
    "export_model": "core",
    "build_onnx": "graph",
    "noise_layout": "graph",
    "ExportError": "graph",
    "qbdl_noise": "reference",
}

__all__ = ["FORMAT", "RUNTIMES", "ImageError", "MetadataError", "Model", "preprocess", "read_onnx_metadata",
           "validate", *_LAZY]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
