"""Errors raised by the data layer, with messages that say what was tried and how to fix it."""

from __future__ import annotations

from pathlib import Path


class DataNotFoundError(FileNotFoundError):
    """A data root, split folder or class folder is missing or empty."""


class BadImageError(ValueError):
    """Unreadable image files were found and ``on_bad_file='error'`` was requested."""


class DataLeakError(ValueError):
    """An OOD set shares images with the in-distribution test set."""


def not_found_message(name: str, path: str | Path, layout: str, how: str, problem: str = "not found") -> str:
    """One-paragraph message naming the path tried, the expected layout and how to get the data."""
    tree = "\n".join("    " + line for line in layout.strip("\n").splitlines())
    return (
        f"{name} data {problem}: tried '{path}'. Expected layout:\n{tree}\n"
        f"How to get it: {how} Then set the data root (e.g. `data.root=/path/to/root` on the command line)."
    )
