"""Triton GPU kernels, one file per operation (kernel + launcher).

Installed as `layerprune.kernels`. Importing this package never requires triton or CUDA:
each kernel module imports triton lazily, and `layerprune.kernels.HAS_TRITON` says whether
it is available.
"""

from __future__ import annotations

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON"]
