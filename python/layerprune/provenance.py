"""Where a result came from: the command line and the versions of the pieces that decide the numbers."""

from __future__ import annotations

import hashlib
import platform
import sys
from functools import lru_cache
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


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (16 hex digits) of layerprune's own code: every .py file of the package and the compiled core."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".so", ".pyd") and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(package)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


__all__ = ["command_line", "source_digest", "versions"]
