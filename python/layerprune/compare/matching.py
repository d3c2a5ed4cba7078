"""Matching methods in parameter count: the request (rate or ratio) that lands a method closest to a target.

Methods whose rate is floored per layer (LLM-Pruner's range setting, the seed mapping) cannot hit an
exact budget; the search below finds, with the allocation alone (no data, no pruning), the request
whose whole-model parameter count is closest to the target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from layerprune.allocation import allocate
from layerprune.arch import adapter_for, decoder_layers
from layerprune.compare.settings import CompareSettings, prune_config
from layerprune.errors import InfeasibleError, InvalidInputError
from layerprune.models import count_parameters
from layerprune.pruning.config import solver_for
from layerprune.pruning.pipeline import spec_for_model

def allocated_params(model: torch.nn.Module, config: Any, importance: Any = None) -> int:
    """Total parameters after the allocation `config` asks for (no data, no pruning); `importance`
    is the layer importance the solver needs (the seed mapping), None for the uniform solvers."""
    return int(allocate(spec_for_model(model, config, importance), solver=solver_for(config)).params_after)


def closest_rate(params_after: Callable[[float], int | None], total: int, ratio: float,
                 iterations: int = 40) -> tuple[float, int]:
    """The requested rate whose whole-model parameter count is closest to ``(1 - ratio) * total``.
    The count is a non-increasing step function of the rate (floors, filters), so bisection finds the
    step that crosses the target; the closer of its two sides wins. `params_after` returns None for a
    request the solver cannot meet at all; the search then stays below it."""
    target = (1.0 - ratio) * total
    lo, hi = 1e-6, 1.0 - 1e-6
    p_lo, p_hi = params_after(lo), params_after(hi)
    while p_hi is None:  # back off to the largest request the solver accepts
        hi = 0.5 * (lo + hi)
        if hi - lo < 1e-9:
            raise InvalidInputError(f"no feasible request lands near ratio {ratio}")
        p_hi = params_after(hi)
    if p_lo is None:
        raise InvalidInputError(f"the smallest request is infeasible near ratio {ratio}")
    if p_hi > target:  # even the largest rate keeps too much (minimum widths): report what it achieves
        return hi, p_hi
    if p_lo <= target:
        return lo, p_lo
    for _ in range(iterations):  # invariant: params_after(lo) > target >= params_after(hi)
        mid = 0.5 * (lo + hi)
        p_mid = params_after(mid)
        if p_mid is None:  # a monotone solver never refuses a request between two it accepted
            raise InvalidInputError(f"request {mid:.6f} is infeasible between feasible ones")
        if p_mid > target:
            lo, p_lo = mid, p_mid
        else:
            hi, p_hi = mid, p_mid
    return (lo, p_lo) if abs(p_lo - target) < abs(p_hi - target) else (hi, p_hi)


def range_rate_for_ratio(model: torch.nn.Module, ratio: float, settings: CompareSettings,
                         params_after: Callable[[float], int] | None = None, iterations: int = 40) -> tuple[float, int]:
    """The per-layer rate inside the reference range that lands the model closest to `ratio`."""
    num_layers = len(decoder_layers(model))
    if params_after is None:
        def params_after(rate: float) -> int:
            return allocated_params(model, prune_config("uniform-range", rate, settings, num_layers))
    return closest_rate(params_after, count_parameters(model)["total"], ratio, iterations)


def seed_ratio_for_ratio(model: torch.nn.Module, ratio: float, settings: CompareSettings, importance: Any,
                         iterations: int = 40) -> tuple[float, int]:
    """The ratio to request from the reference (seed) mapping so that, after its clipping, its
    minimum-effective-rate filter and its floors, the model lands closest to `ratio` of all
    parameters removed: the seed run is matched in parameter count where the mapping allows."""
    num_layers = len(decoder_layers(model))

    def params_after(requested: float) -> int | None:
        try:
            return allocated_params(model, prune_config("unbalanced-seed", requested, settings, num_layers), importance)
        except InfeasibleError:
            return None

    return closest_rate(params_after, count_parameters(model)["total"], ratio, iterations)


def granule_params(model: torch.nn.Module, mlp_step: int = 1) -> int:
    """Parameters of the largest unit a solver moves: one KV group (its r query heads, K, V rows and
    o_proj columns, with their biases) or one MLP step (gate/up rows + down column per channel)."""
    shape = adapter_for(model).layer_shape(model.config)
    kv_group = shape.params(kv_groups=shape.num_kv_heads) - shape.params(kv_groups=shape.num_kv_heads - 1)
    step = min(mlp_step, shape.intermediate)
    return max(kv_group, shape.params(mlp=shape.intermediate) - shape.params(mlp=shape.intermediate - step))
