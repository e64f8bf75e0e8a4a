"""Atomic file writes and safe loading: nothing half-written, nothing unpickled."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from qbdl.atomic import atomic_write_bytes


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, str):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf; null marks "undefined"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as JSON atomically (tensors and numpy scalars converted, non-finite floats as null)."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_bytes(path, text.encode())


def safe_torch_load(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """torch.load with weights_only=True; a file that needs arbitrary unpickling is refused with a clear error."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(
            f"refusing to load {str(path)!r}: it is not loadable with torch.load(weights_only=True) "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). qbdl only loads plain "
            "tensor state dicts, because unpickling arbitrary objects can run code. Re-create the file with "
            "qbdl, or re-save it as a state dict (torch.save(model.state_dict(), path)) or safetensors."
        ) from exc


def safe_load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file with a clear ValueError for a file that is not (or no longer) safetensors."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise ValueError(
            f"cannot load {str(path)!r} as safetensors ({type(exc).__name__}: {exc}): the file is truncated, "
            "corrupt or not a safetensors file (e.g. a pickle renamed to .safetensors, which qbdl never "
            "unpickles). Re-create it with qbdl or safetensors.torch.save_file."
        ) from exc
