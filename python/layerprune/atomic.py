"""Atomic file writes: a temporary file in the target's folder, fsync, then `os.replace`.

A reader never sees a half-written file, and a crash or Ctrl-C leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerprune.errors import InvalidInputError


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def json_safe(obj: Any) -> Any:
    """`obj` as strict JSON values: non-finite floats become None, tuples lists, paths strings, numpy and
    torch scalars and arrays plain numbers and lists. Any other type raises InvalidInputError."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if callable(getattr(obj, "tolist", None)):  # numpy / torch scalars and arrays
        return json_safe(obj.tolist())
    raise InvalidInputError(f"value of type {type(obj).__name__} cannot be written as JSON")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """`write_text_atomic` of `obj` as indented JSON (NaN/inf are written as null)."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)
