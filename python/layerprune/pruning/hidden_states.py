"""Calibration hidden states of the layer-by-layer engine: on the device, in RAM, or in memory-mapped files.

Each stream (the calibration batch through the layers so far, the refit batch, one perturbed copy per
layer-importance probe) is a ``[n, T, d]`` tensor that the engine overwrites layer after layer. A pool hands
out slots in three tiers, filled in order: the compute device (CUDA only, up to ``device_budget_bytes``),
host RAM (up to ``ram_budget_bytes``), then a memory-mapped file in ``spill_dir``, which the kernel may write
back and evict. The pool records how much went where.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from layerprune.errors import InternalError

# numpy has no bfloat16: its bits are stored as uint16 and viewed back
_NUMPY_STORAGE = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
                  torch.bfloat16: np.uint16}


@dataclass
class PoolStats:
    peak_device_bytes: int = 0
    peak_ram_bytes: int = 0
    spilled_bytes: int = 0  # total bytes ever written to memory-mapped files
    spilled_streams: int = 0
    live_spilled_bytes: int = 0
    peak_spilled_bytes: int = 0


@dataclass
class StoredHidden:
    """One stream's slot; ``get`` returns the tensor (on the compute device), ``set`` overwrites it in place."""

    pool: "HiddenStatePool"
    shape: tuple[int, ...]
    dtype: torch.dtype
    tier: str
    tensor: torch.Tensor | None
    path: Path | None = None
    _mmap: np.memmap | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def get(self) -> torch.Tensor:
        if self.tensor is None:
            raise InternalError("hidden states: read after free")
        return self.tensor.to(self.pool.device)

    def set(self, value: torch.Tensor) -> None:
        if self.tensor is None:
            raise InternalError("hidden states: write after free")
        if tuple(value.shape) != self.shape:
            raise InternalError(f"hidden states: shape {tuple(value.shape)} written to a slot of {self.shape}")
        if value.data_ptr() != self.tensor.data_ptr():
            self.tensor.copy_(value)

    def free(self) -> None:
        self.pool._release(self)


class HiddenStatePool:
    """Slots for hidden-state streams within a device budget, a RAM budget, then memory-mapped files."""

    def __init__(self, device: str | torch.device = "cpu", *, ram_budget_bytes: int | None = None,
                 device_budget_bytes: int = 0, spill_dir: str | Path | None = None) -> None:
        self.device = torch.device(device)
        self.ram_budget = ram_budget_bytes
        self.device_budget = device_budget_bytes if self.device.type != "cpu" else 0
        self._spill_parent = None if spill_dir is None else Path(spill_dir)
        self._spill_dir: Path | None = None
        self._used = {"device": 0, "ram": 0}
        self._count = 0
        self.stats = PoolStats()

    def _folder(self) -> Path:
        if self._spill_dir is None:
            if self._spill_parent is not None:
                self._spill_parent.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="hidden-", dir=self._spill_parent))
        return self._spill_dir

    def store(self, value: torch.Tensor, *, copy: bool = True) -> StoredHidden:
        """A slot holding ``value`` (copied unless ``copy=False`` and it can stay where it is)."""
        shape, dtype = tuple(value.shape), value.dtype
        nbytes = value.numel() * value.element_size()
        if self.device.type != "cpu" and self._used["device"] + nbytes <= self.device_budget:
            tier = "device"
            tensor = value.to(self.device)
            tensor = tensor.clone() if copy and tensor.data_ptr() == value.data_ptr() else tensor
        elif self.ram_budget is None or self._used["ram"] + nbytes <= self.ram_budget:
            tier = "ram"
            tensor = value.to("cpu")
            tensor = tensor.clone() if copy and tensor.data_ptr() == value.data_ptr() else tensor
        else:
            return self._spill(value)
        self._used[tier] += nbytes
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self._used["device"])
        self.stats.peak_ram_bytes = max(self.stats.peak_ram_bytes, self._used["ram"])
        return StoredHidden(self, shape, dtype, tier, tensor.contiguous())

    def _spill(self, value: torch.Tensor) -> StoredHidden:
        if value.dtype not in _NUMPY_STORAGE:
            raise InternalError(f"hidden states: cannot spill dtype {value.dtype}")
        self._count += 1
        path = self._folder() / f"stream-{self._count}.bin"
        mapped = np.memmap(path, dtype=_NUMPY_STORAGE[value.dtype], mode="w+", shape=tuple(value.shape))
        tensor = torch.from_numpy(mapped)
        if value.dtype == torch.bfloat16:
            tensor = tensor.view(torch.bfloat16)
        tensor.copy_(value)
        slot = StoredHidden(self, tuple(value.shape), value.dtype, "mmap", tensor, path, mapped)
        self.stats.spilled_bytes += slot.nbytes
        self.stats.spilled_streams += 1
        self.stats.live_spilled_bytes += slot.nbytes
        self.stats.peak_spilled_bytes = max(self.stats.peak_spilled_bytes, self.stats.live_spilled_bytes)
        return slot

    def _release(self, slot: StoredHidden) -> None:
        if slot.tensor is None:
            return
        slot.tensor = None
        if slot.tier == "mmap":
            slot._mmap = None
            if slot.path is not None:
                slot.path.unlink(missing_ok=True)
            self.stats.live_spilled_bytes -= slot.nbytes
        else:
            self._used[slot.tier] -= slot.nbytes

    def close(self) -> None:
        """Remove the spill folder (every slot must be freed or unused from here on)."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None


__all__ = ["HiddenStatePool", "PoolStats", "StoredHidden"]
