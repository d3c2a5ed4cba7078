"""The data-parallel group layerprune's calibration runs in, and joining the one torchrun describes.

Inside :func:`data_parallel` (or after :func:`initialize`) every rank holds its own share of the calibration
samples (:func:`~layerprune.distributed.collectives.local_samples`), and every calibration statistic
(losses and their token counts, activation sums, Gram matrices, gradients before they are scored) is summed
over the ranks, so each rank ends with the statistics of the whole batch. Outside it nothing is reduced, even
in a process that has a process group of its own.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from layerprune.errors import InvalidInputError

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DataParallel:
    """A group of ranks that share the calibration samples. ``device`` is where a tensor goes for a collective:
    the CPU for gloo, this rank's GPU for NCCL."""

    rank: int
    world_size: int
    group: Any  # a torch.distributed ProcessGroup (None: the default group)
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


_ACTIVE: DataParallel | None = None
_OWNS_GROUP = False  # the default process group was created by initialize(): shutdown() destroys it


def active() -> DataParallel | None:
    """The data-parallel group in force, or None (one process: nothing is reduced)."""
    return _ACTIVE


def rank() -> int:
    return 0 if _ACTIVE is None else _ACTIVE.rank


def world_size() -> int:
    return 1 if _ACTIVE is None else _ACTIVE.world_size


def is_rank0() -> bool:
    return _ACTIVE is None or _ACTIVE.rank == 0


def collective_device(group: Any) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def data_parallel(group: Any = None) -> Iterator[DataParallel | None]:
    """Run layerprune's calibration data-parallel over ``group`` (default: the default process group) inside.

    Yields the group, or None when it has a single rank (then nothing changes). Nesting with the same group
    keeps the outer one.
    """
    global _ACTIVE
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidInputError("data_parallel: torch.distributed has no process group (call "
                                "torch.distributed.init_process_group, or run under torchrun)")
    size = dist.get_world_size(group)
    if size == 1:
        yield None
        return
    if _ACTIVE is not None and _ACTIVE.group is group:
        yield _ACTIVE
        return
    saved = _ACTIVE
    _ACTIVE = DataParallel(rank=dist.get_rank(group), world_size=size, group=group, device=collective_device(group))
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = saved


def run_environment(executor: str, device: Any) -> dict[str, Any]:
    """How a run was made: its executor (``memory``: the whole model; ``layers``: layer by layer from disk), the
    device it computed on, the data-parallel world (size and backend: one process is 1 and None) and the torch
    threads of each process."""
    group = active()
    backend = None
    if group is not None and torch.distributed.is_initialized():
        backend = str(torch.distributed.get_backend(group.group))
    return {"executor": executor, "device": str(device), "world_size": world_size(), "backend": backend,
            "threads": torch.get_num_threads()}


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun (or any env:// launcher) sets it; 1 when the process was started alone."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise InvalidInputError(f"WORLD_SIZE: expected an integer, got {value!r}") from None
    if size < 1:
        raise InvalidInputError(f"WORLD_SIZE: must be >= 1, got {size}")
    return size


def pick_backend(backend: str = "auto") -> str:
    """``auto``: NCCL when this node has a GPU for every local rank, else gloo."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"


def initialize(backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DataParallel | None:
    """Join the process group torchrun describes (``env://``: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and
    make it layerprune's data-parallel group for the rest of the process (until :func:`shutdown`).

    NCCL puts this rank on ``cuda:LOCAL_RANK``. Returns the group (None for a single rank, which still gets a
    process group: FSDP needs one).
    """
    global _ACTIVE, _OWNS_GROUP
    import torch.distributed as dist

    chosen = pick_backend(backend)
    if chosen == "nccl":
        if not torch.cuda.is_available():
            raise InvalidInputError("backend nccl: this machine has no CUDA device (use --dist-backend gloo)")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            if launched_world_size() == 1 and "MASTER_ADDR" not in os.environ:
                # a lone process (FSDP over one rank): an in-process store, no port to pick
                dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            else:
                dist.init_process_group(chosen, timeout=timeout)
            _OWNS_GROUP = True
        except Exception as exc:  # the rendezvous' own errors (timeouts, refused connections, bad env)
            raise InvalidInputError(f"torch.distributed: cannot join the process group ({type(exc).__name__}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})") from None
    size = dist.get_world_size()
    _ACTIVE = None if size == 1 else DataParallel(rank=dist.get_rank(), world_size=size, group=None,
                                                  device=collective_device(None))
    return _ACTIVE


def shutdown() -> None:
    """Leave the data-parallel mode, and destroy the default process group if :func:`initialize` created it."""
    global _ACTIVE, _OWNS_GROUP
    import torch.distributed as dist

    _ACTIVE = None
    if _OWNS_GROUP and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def model_device() -> torch.device:
    """Where this rank's model should live: its GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    if _ACTIVE is not None:
        return _ACTIVE.device
    if dist.is_available() and dist.is_initialized():
        return collective_device(None)
    return torch.device("cpu")


__all__ = ["BACKENDS", "DEFAULT_TIMEOUT_S", "DataParallel", "active", "data_parallel", "initialize", "is_rank0",
           "run_environment",
           "launched_world_size", "model_device", "pick_backend", "rank", "shutdown", "world_size"]
