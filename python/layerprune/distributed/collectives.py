"""Sums, broadcasts and sample shares over the data-parallel group (:mod:`layerprune.distributed.group`).

Every function is a no-op in one process (no group in force), so the single-process results stay bit for
bit what they were. Calibration statistics are sums over samples, so sharing the samples between ranks and
summing reproduces the one-process statistics up to the order of the float additions; a mean is a sum and a
count reduced together.

Samples are shared in turn: rank ``r`` of ``W`` holds samples ``r, r + W, r + 2W, ...``, so the first ``n``
samples of the batch (``curve_samples``) are spread over every rank too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from layerprune.distributed.group import DataParallel, collective_device, active
from layerprune.errors import InvalidInputError, LayerpruneError

T = TypeVar("T")
# Tensors up to this many bytes are summed in one flat buffer (one collective for many small statistics).
BUCKET_BYTES = 32 * 2**20


def _target(group: Any) -> tuple[Any, torch.device] | None:
    """(group, device) of a collective: ``group`` when given, else the data-parallel group; None: no-op."""
    if group is not None:
        import torch.distributed as dist

        return (group, collective_device(group)) if dist.get_world_size(group) > 1 else None
    dp = active()
    return None if dp is None else (dp.group, dp.device)


def share_indices(n: int, rank: int, world: int) -> range:
    """Sample indices rank ``rank`` of ``world`` holds out of ``n``: ``rank, rank + world, ...``."""
    return range(rank, n, world)


def check_shareable(n: int, what: str) -> None:
    """Every rank needs at least one of the ``n`` samples called ``what`` (a decoder layer cannot run on none)."""
    dp = active()
    if dp is not None and n < dp.world_size:
        raise InvalidInputError(f"{what}: {n} samples cannot be shared by {dp.world_size} ranks (every rank needs "
                                f"at least one: use at least {dp.world_size}, or fewer ranks)")


def local_samples(ids: torch.Tensor, what: str = "calib_samples") -> torch.Tensor:
    """This rank's share of a batch ``[n, ...]`` that every rank holds whole (the batch itself in one process)."""
    dp = active()
    if dp is None:
        return ids
    check_shareable(int(ids.shape[0]), what)
    return ids[dp.rank :: dp.world_size].contiguous()


def local_prefix(n_global: int, n_local: int) -> int:
    """How many of this rank's ``n_local`` samples are among the first ``n_global`` samples of the batch."""
    dp = active()
    if dp is None:
        return min(n_global, n_local)
    return min(n_local, len(share_indices(n_global, dp.rank, dp.world_size)))


def all_reduce_sum_(tensors: Sequence[torch.Tensor], *, group: Any = None) -> None:
    """Sum every tensor over the ranks, in place. Small ones travel together in one flat buffer per dtype."""
    target = _target(group)
    if target is None:
        return
    import torch.distributed as dist

    pg, device = target
    pending: dict[torch.dtype, list[torch.Tensor]] = {}

    def flush(dtype: torch.dtype) -> None:
        items = pending.pop(dtype, [])
        if not items:
            return
        flat = torch.cat([t.reshape(-1).to(device) for t in items])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg)
        offset = 0
        for t in items:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    for t in tensors:
        if t.numel() * t.element_size() > BUCKET_BYTES:
            if t.device == device and t.is_contiguous():
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
            else:
                moved = t.to(device).contiguous()
                dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=pg)
                t.copy_(moved)
            continue
        items = pending.setdefault(t.dtype, [])
        items.append(t)
        if sum(x.numel() * x.element_size() for x in items) > BUCKET_BYTES:
            flush(t.dtype)
    for dtype in list(pending):
        flush(dtype)


def sum_values(*values: float) -> tuple[float, ...]:
    """Python numbers summed over the ranks in float64 (returned unchanged in one process)."""
    if _target(None) is None:
        return tuple(values)
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_sum_([buffer])
    return tuple(float(v) for v in buffer.tolist())


def global_count(n: int) -> int:
    """An integer count (tokens, samples) summed over the ranks."""
    return int(round(sum_values(float(n))[0]))


def token_share(local_tokens: int) -> float:
    """This rank's fraction of the tokens of the whole batch: scales a local mean loss so the ranks' gradients
    sum to the gradient of the mean over every token (1.0 in one process)."""
    if _target(None) is None:
        return 1.0
    return float(local_tokens) / float(global_count(local_tokens))


def ranks_where(flag: bool) -> list[int]:
    """The ranks whose ``flag`` is true (every rank learns all of them); ``[0]`` or ``[]`` in one process."""
    dp = active()
    if dp is None:
        return [0] if flag else []
    marks = torch.zeros(dp.world_size, dtype=torch.float64)
    marks[dp.rank] = 1.0 if flag else 0.0
    all_reduce_sum_([marks])
    return [r for r, v in enumerate(marks.tolist()) if v > 0]


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled); ``obj`` itself in one process."""
    dp = active()
    if dp is None:
        return obj
    import torch.distributed as dist

    box = [obj if dp.rank == src else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(dp.group, src) if dp.group is not None else src,
                               group=dp.group, device=dp.device if dp.device.type == "cuda" else None)
    return box[0]  # type: ignore[return-value]


def on_rank0(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` computed by rank 0 alone and its result broadcast to every rank.

    When rank 0 fails, every rank learns it: a layerprune error is re-raised everywhere as rank 0's, anything
    else leaves the other ranks waiting for rank 0's failure to be announced (:func:`wait_for_failure`)."""
    from layerprune.distributed.exits import wait_for_failure

    dp = active()
    if dp is None:
        return fn(*args, **kwargs)
    if dp.is_rank0:
        try:
            result = fn(*args, **kwargs)
        except LayerpruneError as exc:
            broadcast_object(("error", exc))
            raise
        except BaseException:
            broadcast_object(("failed", None))
            raise
        broadcast_object(("ok", result))
        return result
    status, payload = broadcast_object(None)
    if status == "ok":
        return payload  # type: ignore[no-any-return]
    if status == "error":
        wait_for_failure(payload)
    wait_for_failure(InvalidInputError("rank 0 failed (its error line says why)"))
    raise AssertionError("unreachable")  # wait_for_failure always raises


def all_gather_rows(local: torch.Tensor, group: Any) -> torch.Tensor:
    """The 1-D pieces every rank of ``group`` holds, concatenated in rank order (pieces may differ in length:
    FSDP's last shards are shorter)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return local
    device = collective_device(group)
    sizes = torch.zeros(world, dtype=torch.float64)
    sizes[dist.get_rank(group)] = float(local.numel())
    all_reduce_sum_([sizes], group=group)
    lengths = [int(v) for v in sizes.tolist()]
    longest = max(lengths)
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()] = local.to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, lengths)]).to(local.device)


__all__ = ["BUCKET_BYTES", "DataParallel", "all_gather_rows", "all_reduce_sum_", "broadcast_object", "check_shareable",
           "global_count", "local_prefix", "local_samples", "on_rank0", "ranks_where", "share_indices", "sum_values",
           "token_share"]
