"""Readers of results.json's parts that are pure Python (no torch): cheap to import for reports and tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def shift_parts(shift: Mapping[str, Any]) -> dict[str, Any]:
    """``{cells, summary, mce, meta}`` of results["shift"], of this shape or of older runs' (reserved ``_`` keys).

    Older results.json kept the variants beside ``_summary`` / ``_mce`` / ``_meta`` (and the temperatures in
    ``_meta``); both read the same here.
    """
    if not shift:
        return {"cells": {}, "summary": {}, "mce": {}, "meta": {}}
    if "cells" in shift:
        return {k: dict(shift.get(k) or {}) for k in ("cells", "summary", "mce", "meta")}
    return {
        "cells": {k: v for k, v in shift.items() if not str(k).startswith("_")},
        "summary": dict(shift.get("_summary") or {}),
        "mce": dict(shift.get("_mce") or {}),
        "meta": dict(shift.get("_meta") or {}),
    }
