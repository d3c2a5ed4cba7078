"""Which executor runs a pruning: the whole model in memory, or layer by layer from its checkpoint on disk.

The library's policy (the CLI only passes the flags): a local safetensors checkpoint whose weights, at the run's
dtype, exceed the memory the run may use goes layer by layer; everything else is loaded whole. A flag can force
layer by layer. The layer-by-layer executor keeps its calibration hidden states within half of what two decoder
layers and the head's working set leave of that memory (by default of a quarter of the checkpoint), and spills the
rest to disk.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from layerprune.models import resolve_model
from layerprune.models.checkpoint import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint


# glibc's mallopt parameter, and the size from which the layer-by-layer executor's allocations are mapped pages
M_MMAP_THRESHOLD = -3
MAPPED_ALLOCATION_BYTES = 2**20
# glibc's own ceiling for its dynamic threshold on 64-bit systems: what a run leaves behind (the dynamic
# adjustment cannot be turned back on, so the process goes on as glibc's steady state after large frees)
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def return_freed_memory_to_the_system(threshold: int = MAPPED_ALLOCATION_BYTES) -> bool:
    """Make glibc serve every allocation of at least ``threshold`` bytes from pages of its own, unmapped when freed.

    By default glibc raises this threshold as large blocks are freed (up to 32 MiB), so a layer's tensors, freed
    before the next layer's arrive, stay in the heap and count in the resident set; measured on a
    Llama-3.2-1B-shaped checkpoint layer by layer, they held 1.0 GiB more at the peak. Setting the threshold
    turns that adjustment off for the process; the executor sets ``GLIBC_MMAP_THRESHOLD_MAX`` when it ends, so that
    the rest of the process is not slowed by page faults. False where the C library has no ``mallopt`` (not
    glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def available_memory() -> int:
    """Bytes the system could give this process now (MemAvailable; free pages where /proc is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_size(nbytes: int) -> str:
    """``6.4 GB`` (powers of 1000, one decimal)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def choose_executor(model: str | os.PathLike[str], dtype: torch.dtype, max_memory: int | None = None,
                    layer_by_layer: bool = False, limit_name: str = "max_memory") -> tuple[str, str | None]:
    """(``"memory"`` or ``"layers"``, why ``"layers"`` was chosen when it was not asked for): ``model``'s weights at
    ``dtype`` against ``max_memory`` (default: the memory available now). A GGUF file, a hub id or a folder
    without safetensors is always loaded whole."""
    if layer_by_layer:
        return "layers", None
    resolved = resolve_model(model)
    if not isinstance(resolved, Path) or not any((resolved / f).is_file() for f in (INDEX_FILE, SINGLE_FILE)):
        return "memory", None
    limit = max_memory if max_memory is not None else available_memory()
    with SafetensorsCheckpoint(resolved) as checkpoint:
        weights = checkpoint.nbytes(dtype=dtype)
    if weights <= limit:
        return "memory", None
    source = limit_name if max_memory is not None else "the available memory"
    dtype_name = str(dtype).removeprefix("torch.")
    return "layers", (f"the weights ({format_size(weights)} in {dtype_name}) exceed {source} "
                      f"({format_size(limit)})")


# The layer-by-layer executor's goal: its peak memory above the imports at most this share of the checkpoint
LAYER_BY_LAYER_SHARE = 0.25


def hidden_state_budget(max_memory: int | None, largest_layer_bytes: int, head_working_bytes: int,
                        checkpoint_bytes: int) -> int:
    """Bytes the layer-by-layer executor may keep its calibration hidden states in before spilling them to disk:
    half of what two decoder layers and the head's working set (the head matrix where it is held whole, else a
    row block and the losses' logits) leave of ``max_memory``, by default the smaller of the memory available
    and ``LAYER_BY_LAYER_SHARE`` of the checkpoint."""
    limit = max_memory if max_memory is not None else min(available_memory(),
                                                          int(LAYER_BY_LAYER_SHARE * checkpoint_bytes))
    return max(0, limit - 2 * largest_layer_bytes - head_working_bytes) // 2


__all__ = ["LAYER_BY_LAYER_SHARE", "available_memory", "choose_executor", "format_size", "hidden_state_budget",
           "return_freed_memory_to_the_system"]
