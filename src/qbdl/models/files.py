"""Model files: save and load state dicts (safetensors, or torch files with weights_only), and their size."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from qbdl.io import atomic_write_bytes, safe_load_safetensors, safe_torch_load


def save_state(model: nn.Module, path: str | Path) -> Path:
    """Save a model's state dict as safetensors, atomically."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(path, save(state))


def load_state(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a .safetensors or torch state dict (weights_only) into `model`."""
    path = str(path)
    if path.endswith(".safetensors"):
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"model file {path!r} does not exist; give the path of a stage output of an earlier "
                "run (RUN_DIR/dnn.safetensors or RUN_DIR/bnn.safetensors)"
            )
        _load_into(model, safe_load_safetensors(path), path)
    else:
        load_weights(model, path)
    return model


def _load_into(model: nn.Module, state: object, path: str) -> None:
    """model.load_state_dict(state), a file that does not fit the model reported as one ValueError naming it."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path!r} does not hold a state dict (name -> tensor); give a model file saved by qbdl or "
            "torch.save(model.state_dict(), path)"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{path!r} does not fit this model ({str(exc).splitlines()[0]} ...): its tensors' names, shapes or "
            "count differ from the configured architecture. Give the file of a run with the same model config, "
            "or check that the file is not corrupt"
        ) from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{path!r}: tensor {bad[0]!r} holds NaN or infinite values ({len(bad)} tensor(s) in all): the file "
            "is corrupt or came from a diverged training run; re-create it (train again, or resume from an "
            "earlier checkpoint)"
        )


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict from a .safetensors or torch file (weights_only=True: no code can run)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights file {path!r} does not exist. Give the path of a state dict saved with "
            "torch.save(model.state_dict(), path) or safetensors (e.g. torchvision's resnet50-0676ba61.pth "
            "from download.pytorch.org/models), or set the weights option to download when online."
        )
    if path.endswith(".safetensors"):
        state = safe_load_safetensors(path)
    else:
        state = safe_torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    _load_into(model, state, path)


def state_dict_bytes(model: nn.Module, skip_prefixes: tuple[str, ...] = ("prior_",)) -> int:
    """Size of the inference weights as saved by torch.save (prior buffers are training-only, left out)."""
    state = {
        k: v for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith(skip_prefixes)
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer().nbytes
