"""Resident memory of a model: the bytes of every tensor it holds, each storage counted once."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn


def _tensors(obj: object, depth: int = 0) -> Iterator[Tensor]:
    """Tensors in an attribute value (a tensor, or lists/tuples/dicts of them, two levels deep)."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth < 2 and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif depth < 2 and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, depth + 1)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the parameters, buffers and tensor attributes (noise pools, packed weights, caches) of `model`.

    Each storage is counted once (shared and viewed tensors too). The process itself (torch's import, about
    0.5 GiB) and transient activations are not included: this is what the model keeps resident between calls.
    """
    seen: dict[tuple[str, int], int] = {}
    for m in model.modules():
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        for t in [*own, *_tensors(list(vars(m).values()))]:
            if t is None or not isinstance(t, Tensor) or t.is_meta:
                continue
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # opaque tensors (e.g. mkldnn) have no storage
                seen[("opaque", id(t))] = t.numel() * t.element_size()
                continue
            seen[(str(t.device), st.data_ptr())] = max(
                seen.get((str(t.device), st.data_ptr()), 0), st.nbytes()
            )
    return sum(seen.values())
