"""OOD-vs-test leak check: a coarse, normalisation-invariant hash of each image."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from qbdl.data.errors import DataLeakError


def _image_key(x: torch.Tensor) -> str | None:
    """Canonical hash of one image tensor, robust to per-channel normalisation, resizing and gray<->RGB."""
    x = torch.as_tensor(x).float()
    if x.ndim == 2:
        x = x.unsqueeze(0)
    # per-channel standardisation removes any per-channel affine normalisation
    x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-6)
    g = F.adaptive_avg_pool2d(x.mean(0, keepdim=True).unsqueeze(0), 8)[0, 0]
    s = g.std()
    if not torch.isfinite(s) or s < 1e-3:
        return None  # flat images (blank tiles, padding) would collide without being the same image
    q = torch.round((g - g.mean()) / s * 2).clamp(-8, 8).to(torch.int8)
    return hashlib.sha1(q.numpy().tobytes()).hexdigest()


def fingerprint(ds: Dataset, n: int | None = None) -> dict[str, int]:
    """Map of canonical image hash -> item index for the first ``n`` items of ``ds`` (all if None)."""
    m = len(ds) if n is None else min(n, len(ds))  # type: ignore[arg-type]
    out: dict[str, int] = {}
    for i in range(m):
        key = _image_key(ds[i][0])
        if key is not None:
            out.setdefault(key, i)
    return out


def check_no_leak(
    test_ds: Dataset, ood_ds: Dataset, n_test: int | None = None, n_ood: int | None = 64
) -> None:
    """Raise DataLeakError when the OOD set shares images with the test set (hash of a few images).

    Exact under the same transform; best-effort across different resizing, normalisation and
    gray<->RGB conversion (a coarse 8x8 standardised thumbnail is hashed).
    """
    test_keys = fingerprint(test_ds, n_test)
    ood_keys = fingerprint(ood_ds, n_ood)
    shared = [(ood_keys[k], test_keys[k]) for k in ood_keys.keys() & test_keys.keys()]
    if shared:
        pairs = ", ".join(f"ood[{a}]=test[{b}]" for a, b in sorted(shared)[:5])
        raise DataLeakError(
            f"the OOD set shares {len(shared)} of {len(ood_keys)} checked images with the test set ({pairs}); "
            "an OOD set must not be drawn from the in-distribution test data."
        )
