"""Gradient element scores of a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every decoder layer, then the whole model, is wrapped over a 1-D mesh of all the ranks. Each rank
back-propagates the mean loss of its own calibration samples, weighted by its share of the tokens; FSDP's
reduce-scatter sums the gradients over the ranks and leaves each rank its rows of every weight, which
:class:`~layerprune.scoring.GradientScorer` scores and drops at once. Row scores come from the local rows,
column scores are partial sums summed over the ranks, and every rank ends with the scores a single process
computes on the whole batch (to float rounding).

Memory per rank: its shard of the weights, the activations of its samples, one decoder layer's full weights
and gradient while FSDP gathers and reduces them, and one reduced gradient shard (a layer's) until it is scored.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from layerprune.arch import adapter_for
from layerprune.errors import InvalidInputError
from layerprune.scoring.groups import element_group_scores

SHARDED_KINDS = ("taylor", "vectorize")


def default_mesh(device: torch.device) -> Any:
    """A 1-D device mesh of every rank of the default process group, on ``device``'s type."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidInputError("fsdp: needs a torch.distributed process group (run under torchrun, or call "
                                "torch.distributed.init_process_group first)")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: torch.nn.Module, mesh: Any = None) -> torch.nn.Module:
    """Wrap every decoder layer of ``model``, then ``model`` itself (embeddings, final norm, head), with
    ``fully_shard`` over ``mesh`` (default: :func:`default_mesh`), in place; returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    adapter = adapter_for(model, "fsdp: model")
    mesh = mesh if mesh is not None else default_mesh(next(model.parameters()).device)
    for layer in adapter.decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded_group_scores(model: torch.nn.Module, calib_ids: torch.Tensor, importance: str = "taylor",
                         progress: bool = True, mesh: Any = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`~layerprune.scoring.groups.element_group_scores` of an FSDP2-sharded copy of ``model`` (not
    modified), from this rank's calibration samples ``calib_ids``; every rank gets the whole batch's scores."""
    if importance not in SHARDED_KINDS:
        raise InvalidInputError(f"importance: {importance!r} cannot be scored on a sharded model (only "
                                f"{', '.join(SHARDED_KINDS)}: one backward over the batch)")
    sharded = shard_model(copy.deepcopy(model), mesh)
    try:
        return element_group_scores(sharded, calib_ids, importance=importance, progress=progress)
    finally:
        del sharded


__all__ = ["SHARDED_KINDS", "default_mesh", "shard_model", "sharded_group_scores"]
