"""Quantized-engine selection: every INT8 code path goes through `set_backend`."""

from __future__ import annotations

import torch

BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")


def supported_backends() -> list[str]:
    """Quantized engines this torch build offers (torch.backends.quantized.supported_engines, minus 'none')."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_backend(backend: str) -> str:
    """Validate a backend name; ValueError lists the supported engines."""
    supported = supported_backends()
    if backend not in BACKENDS or backend not in supported:
        raise ValueError(f"unknown or unavailable quantized backend {backend!r}; supported here: {supported}")
    return backend


def set_backend(backend: str) -> str:
    """Make `backend` the active quantized engine (packing and kernels must use the same one)."""
    check_backend(backend)
    if torch.backends.quantized.engine != backend:
        torch.backends.quantized.engine = backend
    return backend
