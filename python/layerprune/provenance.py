"""Where a result came from: the command line and the versions of the pieces that decide the numbers."""

from __future__ import annotations

import platform
import sys
from pathlib import Path


def versions() -> dict[str, str]:
    """Versions of the pieces that decide the numbers (python, torch, transformers, torch-pruning, layerprune)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "torch-pruning", "numpy", "layerprune"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def command_line() -> list[str]:
    """The program name and its arguments, as typed."""
    return [Path(sys.argv[0]).name if sys.argv else "", *sys.argv[1:]]


__all__ = ["command_line", "versions"]
