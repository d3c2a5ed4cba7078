"""Healing with the decoder layers sharded over the ranks by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each decoder layer's weights, gradients and AdamW moments live on the ranks as row shards (DTensor
``Shard(0)``); a layer's full weights exist only while its forward or backward runs. The embeddings, final norm
and head stay whole on every rank (the fused head reads the head's weight directly), and their gradients are
summed over the ranks as in data-parallel healing. FSDP's reduce-scatter sums the layers' gradients (divide
factor 1), so a step is the one-process step on the whole batch, up to the order of float additions.

Per rank, training holds 1/N of the layers' weights, gradients and AdamW moments (4/N floats per weight, against
4 with data parallelism). The twin is sharded from a copy of the student, whose own layers are released meanwhile
(:func:`release_decoder_layers`); at the end every tensor is gathered back into it, one at a time
(:func:`copy_back`), so the result and the saved folder are a plain model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from layerprune import distributed
from layerprune.arch import adapter_for
from layerprune.errors import InvalidInputError


@functools.cache
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without torch.distributed
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    kind = _dtensor_type()
    return kind is not None and isinstance(tensor, kind)


def check_shardable(batch_size: int) -> None:
    """Refuse sharding without ranks, or with a batch that does not split evenly over them."""
    if distributed.active() is None:
        raise InvalidInputError("--fsdp needs a torch.distributed process group (run under torchrun)")
    world = distributed.world_size()
    if batch_size % world:
        raise InvalidInputError(f"--fsdp: --batch-size {batch_size} must be a multiple of the {world} ranks")


def shard_decoder_layers(model: torch.nn.Module, batch_size: int) -> torch.nn.Module:
    """Wrap every decoder layer of ``model`` (a peft model's base layers) with ``fully_shard`` over all the
    ranks, gradients summed; in place. Every rank must run as many forwards as the others, so the batch of
    ``batch_size`` sequences must split evenly."""
    from torch.distributed.fsdp import fully_shard

    from layerprune.scoring.sharded import default_mesh

    check_shardable(batch_size)
    mesh = default_mesh(next(model.parameters()).device)
    for layer in _decoder_layers(model):  # under peft: holding LoRA-wrapped Linears
        # each layer is its own FSDP root, and a root keeps its weights whole after the forward unless told
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        layer.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        layer.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank when sharded: every rank must call)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` placed as ``like`` is (its shard of this rank when ``like`` is sharded)."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)  # type: ignore[attr-defined]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded moment gathered whole (every rank must call)."""
    saved = optimizer.state_dict()
    state = {index: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
             for index, entry in saved["state"].items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def sharded_optimizer_state(saved: dict[str, Any], params: Sequence[torch.Tensor]) -> dict[str, Any]:
    """The inverse of :func:`full_optimizer_state` for an optimizer over ``params`` (in its order): each moment
    shaped like its parameter placed as the parameter is."""
    state = {}
    for index, entry in saved["state"].items():
        p = params[int(index)]
        state[index] = {k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                        for k, v in entry.items()}
    return {"state": state, "param_groups": saved["param_groups"]}


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so that their global 2-norm is at most ``max_norm`` (coefficient
    ``min(1, max_norm / (‖g‖ + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``), where sharded gradients hold
    disjoint rows on each rank and the others are the same on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = sum((float(g.to_local().double().square().sum()) for g in grads if is_sharded(g)), 0.0)
    whole = sum((float(g.double().square().sum()) for g in grads if not is_sharded(g)), 0.0)
    (sharded,) = distributed.sum_values(sharded)
    total = math.sqrt(sharded + whole)
    coefficient = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        (g.to_local() if is_sharded(g) else g).mul_(coefficient)
    return total


def padded_share(rows: Sequence[int], micro_batch: int) -> list[list[int]]:
    """This rank's share of ``rows`` (every world-th one) in micro-batches, as many on every rank: a rank whose
    share runs out first gets empty micro-batches, which run one row and count nothing."""
    world = distributed.world_size()
    local = list(rows[distributed.rank() :: world])
    longest = -(-len(rows) // world)
    count = -(-longest // micro_batch)
    return [local[i * micro_batch : (i + 1) * micro_batch] for i in range(count)]


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(adapter_for(base, "model").inner_model(base).layers)


def release_decoder_layers(model: torch.nn.Module) -> None:
    """Free ``model``'s decoder layers (moved to the meta device) while a sharded twin trains them."""
    for layer in _decoder_layers(model):
        layer.to("meta")


def copy_back(plain: torch.nn.Module, sharded: torch.nn.Module, device: torch.device) -> None:
    """Give ``plain`` (its layers released) every parameter and buffer of its sharded twin, gathered whole one
    tensor at a time (every rank must call)."""
    for layer in _decoder_layers(plain):
        layer.to_empty(device=device)
    targets = {**dict(plain.named_parameters()), **dict(plain.named_buffers())}
    with torch.no_grad():
        for name, tensor in [*sharded.named_parameters(), *sharded.named_buffers()]:
            targets[name].copy_(full_tensor(tensor.detach()))


def gather_trainable(named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every trainable tensor whole, on the CPU, by name (every rank must call when any is sharded)."""
    return {n: full_tensor(p.detach()).to("cpu").contiguous() for n, p in named}


__all__ = ["check_shardable", "clip_grad_norm_", "copy_back", "full_optimizer_state", "full_tensor",
           "gather_trainable", "is_sharded", "padded_share", "release_decoder_layers", "shard_decoder_layers",
           "shard_like", "sharded_optimizer_state"]
