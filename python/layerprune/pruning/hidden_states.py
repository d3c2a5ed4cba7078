"""Calibration hidden states of the layer-by-layer engine: on the device, in RAM, or in files on disk.

Each stream (the calibration batch through the layers so far, the refit batch, one perturbed copy per
layer-importance probe) is a ``[n, T, d]`` tensor that the engine overwrites layer after layer. A pool hands
out slots in three tiers, filled in order: the compute device (CUDA only, up to ``device_budget_bytes``),
host RAM (up to ``ram_budget_bytes``), then a file in ``spill_dir``, written and read whole with
``pwrite`` / ``pread`` (not mapped: a spilled stream is in the process's memory only while a layer uses it; between
layers its bytes are the page cache's, which the kernel writes back and evicts). The pool records how much went
where.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerprune.errors import InternalError

@dataclass
class PoolStats:
    peak_device_bytes: int = 0
    peak_ram_bytes: int = 0
    spilled_bytes: int = 0  # total bytes ever spilled to files
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
    _fd: int | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n

    def _check(self, verb: str) -> None:
        if self.tensor is None and self._fd is None:
            raise InternalError(f"hidden states: {verb} after free")

    def get(self) -> torch.Tensor:
        self._check("read")
        if self._fd is None:
            return self.tensor.to(self.pool.device)
        out = torch.empty(self.shape, dtype=self.dtype)
        view, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
        while done < self.nbytes:
            got = os.preadv(self._fd, [view[done:]], done)
            if got <= 0:
                raise InternalError(f"hidden states: {self.path} ended after {done} of {self.nbytes} bytes")
            done += got
        return out.to(self.pool.device)

    def set(self, value: torch.Tensor) -> None:
        self._check("write")
        if tuple(value.shape) != self.shape:
            raise InternalError(f"hidden states: shape {tuple(value.shape)} written to a slot of {self.shape}")
        if self._fd is not None:
            data = value.detach().to("cpu", self.dtype).contiguous()
            view, done = memoryview(data.view(-1).view(torch.uint8).numpy()), 0
            while done < self.nbytes:
                done += os.pwrite(self._fd, view[done:], done)
        elif value.data_ptr() != self.tensor.data_ptr():
            self.tensor.copy_(value)

    def free(self) -> None:
        self.pool._release(self)


class HiddenStatePool:
    """Slots for hidden-state streams within a device budget, a RAM budget, then files on disk."""

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
        self._count += 1
        path = self._folder() / f"stream-{self._count}.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        slot = StoredHidden(self, tuple(value.shape), value.dtype, "disk", None, path, fd)
        try:
            slot.set(value)
        except BaseException:
            self._release(slot)
            raise
        self.stats.spilled_bytes += slot.nbytes
        self.stats.spilled_streams += 1
        self.stats.live_spilled_bytes += slot.nbytes
        self.stats.peak_spilled_bytes = max(self.stats.peak_spilled_bytes, self.stats.live_spilled_bytes)
        return slot

    def _release(self, slot: StoredHidden) -> None:
        if slot._fd is not None:
            os.close(slot._fd)
            slot._fd = None
            if slot.path is not None:
                slot.path.unlink(missing_ok=True)
            self.stats.live_spilled_bytes -= slot.nbytes
            return
        if slot.tensor is None:
            return
        slot.tensor = None
        self._used[slot.tier] -= slot.nbytes

    def close(self) -> None:
        """Remove the spill folder (every slot must be freed or unused from here on)."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None


__all__ = ["HiddenStatePool", "PoolStats", "StoredHidden"]
