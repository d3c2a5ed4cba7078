"""Triton GPU kernels, one file per operation (kernel + launcher).

Installed as `layerprune.kernels`. Importing this package never requires triton or CUDA:
each kernel module imports triton lazily, and `layerprune.kernels.HAS_TRITON` says whether
it is available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Any

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON", "launch_device", "target_programs"]


@functools.cache
def _sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: Any, programs_per_sm: int) -> int:
    """Grid size the launchers aim for: `programs_per_sm` × SMs on CUDA (the SM count is looked up
    once per device); 1 elsewhere (the interpreter runs programs one after another)."""
    if device.type == "cuda":
        import torch

        return programs_per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def launch_device(device: Any) -> Any:
    """The context a kernel is launched in: Triton launches on the *current* CUDA device and its stream, not on the
    device of the tensors it is given, so a tensor on ``cuda:1`` while ``cuda:0`` is current needs
    ``torch.cuda.device(1)`` around the launch (else the kernel reads another GPU's addresses). Nothing elsewhere
    (the CPU interpreter)."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.device(device)
    return contextlib.nullcontext()
