"""Calibration over several processes (torch.distributed): the data-parallel group, exact sums of the
calibration statistics over its ranks, and the agreement that makes every rank of a job end the same way.

A utility: it imports nothing of the pipeline's stages, and the stages call it at the points where a
statistic is complete (a loss and its token count, activation sums, Gram matrices, gradients before they
are scored). In one process every function here is a no-op.
"""

from layerprune.distributed.collectives import (
    all_gather_rows,
    all_reduce_sum_,
    broadcast_object,
    check_shareable,
    global_count,
    local_prefix,
    local_samples,
    on_rank0,
    ranks_where,
    share_indices,
    sum_values,
    token_share,
)
from layerprune.distributed.exits import ExitAgreement, barrier, exit_agreement, wait_for_failure
from layerprune.distributed.group import (
    BACKENDS,
    DataParallel,
    active,
    data_parallel,
    initialize,
    is_rank0,
    launched_world_size,
    model_device,
    pick_backend,
    rank,
    run_environment,
    shutdown,
    world_size,
)

__all__ = [
    "BACKENDS", "DataParallel", "ExitAgreement", "active", "all_gather_rows", "all_reduce_sum_", "barrier",
    "broadcast_object", "check_shareable", "data_parallel", "exit_agreement", "global_count", "initialize",
    "is_rank0", "launched_world_size", "local_prefix", "local_samples", "model_device", "on_rank0", "pick_backend",
    "rank", "ranks_where", "run_environment", "share_indices", "shutdown", "sum_values", "token_share", "wait_for_failure", "world_size",
]  # fmt: skip
