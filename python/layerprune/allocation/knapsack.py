"""The allocation problem as a multiple-choice knapsack, enumerated from the spec's own words (independently of
the Rust solvers' item lists): the instance the reference optimisers (:mod:`layerprune.allocation.references`)
solve and the allocation search (:mod:`layerprune.pruning.search`) moves in.

* a layer whose attention and MLP are both prunable under ``tie``: one item over every allowed ``(g, f)``;
* otherwise an attention item (every allowed ``g``) and an MLP item (every allowed width), when prunable.

Each item's options run from the least pruning (index 0) to the most. A choice (one option per item) is
feasible when the parameters it removes lie in the window ``[T, T + granule]`` (``granule`` the smallest
prunable step; the widest single step when no allocation lands in the narrow one, as the Rust solvers do) and
it removes at least the KV-cache and FLOPs targets that are set.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from layerprune.allocation.solve import AllocationResult, AllocationSpec, LayerAllocation, target_count
from layerprune.errors import InvalidInputError

_RATE_EPS = 1e-9


@dataclass(frozen=True)
class Option:
    """One choice of an item: KV groups and MLP channels kept in its layer, amounts removed, loss."""

    kv_groups: int
    mlp: int
    params: int
    kv_cache: int
    flops: int
    loss: float


@dataclass(frozen=True)
class Item:
    layer: int
    kind: str  # "attn", "mlp" or "tied"
    options: tuple[Option, ...]


@dataclass
class Knapsack:
    """The instance: items, and each budget as integer bounds on the summed amounts (None: unbounded)."""

    items: list[Item]
    params_window: tuple[int, int] | None  # removed params in [lo, hi] (narrow window)
    params_window_wide: tuple[int, int] | None
    kv_cache_min: int | None
    flops_min: int | None
    constant_loss: float  # loss of the components no item prunes (added to every objective)


def _loss(curve: Any, importance: Any, l: int, kept: int, full: int, index: int) -> float:
    if curve is not None:
        return float(curve[l][index])
    if importance is None:
        return 0.0
    return float(importance[l]) * (1.0 - kept / full) ** 2


def _rate(specific: float | None, shared: float) -> float:
    return float(shared if specific is None else specific)


def build_knapsack(spec: AllocationSpec) -> Knapsack:
    """The multiple-choice knapsack of ``spec`` (its constraints, objective and budgets)."""
    n = len(spec.layers)
    attn_imp = spec.attn_importance if spec.attn_importance is not None else spec.importance
    mlp_imp = spec.mlp_importance if spec.mlp_importance is not None else spec.importance
    lo_a, hi_a = _rate(spec.min_attn_rate, spec.min_rate), _rate(spec.max_attn_rate, spec.max_rate)
    lo_m, hi_m = _rate(spec.min_mlp_rate, spec.min_rate), _rate(spec.max_mlp_rate, spec.max_rate)
    items: list[Item] = []
    constant = 0.0
    granule, granule_max = math.inf, 0
    seq, kvb = spec.flops_seq_len, spec.kv_cache_dtype_bytes
    for l, s in enumerate(spec.layers):
        h, i, step = s.num_kv_heads, s.intermediate, spec.mlp_step
        prot = l in spec.protected
        attn_on = not prot and (spec.attn_layer_start or 0) <= l < (n if spec.attn_layer_end is None else spec.attn_layer_end)
        mlp_on = not prot and (spec.mlp_layer_start or 0) <= l < (n if spec.mlp_layer_end is None else spec.mlp_layer_end)
        gs = [g for g in range(h + 1) if g >= spec.min_kv_groups and lo_a - _RATE_EPS <= 1 - g / h <= hi_a + _RATE_EPS] if attn_on else [h]
        min_mlp = spec.min_mlp if spec.min_mlp is not None else min(step, i)
        widths = [*range(0, i, step), i]
        fs = [f for f in widths if f >= min_mlp and lo_m - _RATE_EPS <= 1 - f / i <= hi_m + _RATE_EPS] if mlp_on else [i]
        if not gs or not fs:
            raise InvalidInputError(f"layer {l}: no allowed KV groups or MLP width")

        def option(g: int, f: int, a_loss: float, m_loss: float) -> Option:
            return Option(g, f, s.params() - s.params(g, f), s.kv_cache_bytes(dtype_bytes=kvb) - s.kv_cache_bytes(g, kvb),
                          s.flops(seq_len=seq) - s.flops(g, f, seq), a_loss + m_loss)

        def a_loss(g: int) -> float:
            return _loss(spec.attn_curves, attn_imp, l, g, h, g)

        def m_loss(f: int) -> float:
            return _loss(spec.mlp_curves, mlp_imp, l, f, i, -(-i // step) if f == i else f // step)

        group = s.params() - s.params(kv_groups=h - 1)
        channels = s.params() - s.params(mlp=i - min(step, i))
        if attn_on and len(gs) > 1:
            granule, granule_max = min(granule, group), max(granule_max, group)
        if mlp_on and len(fs) > 1:
            granule, granule_max = min(granule, channels), max(granule_max, channels)
        if spec.tie and attn_on and mlp_on:
            pairs = [(g, f) for g in gs for f in fs if abs(f / i - g / h) <= 0.5 / h + 1e-12]
            if not pairs:
                raise InvalidInputError(f"layer {l}: tie leaves no (KV groups, MLP width) pair")
            opts = tuple(sorted((option(g, f, a_loss(g), m_loss(f)) for g, f in pairs), key=lambda o: (o.params, -o.kv_groups)))
            items.append(Item(l, "tied", opts))
            continue
        if attn_on:
            items.append(Item(l, "attn", tuple(option(g, i, a_loss(g), 0.0) for g in reversed(gs))))
        else:
            constant += a_loss(h)
        if mlp_on:
            items.append(Item(l, "mlp", tuple(option(h, f, 0.0, m_loss(f)) for f in reversed(fs))))
        else:
            constant += m_loss(i)
    for it in items:
        amounts = sorted(o.params for o in it.options)
        granule_max = max([granule_max, *(b - a for a, b in zip(amounts, amounts[1:]))])
    granule = 0 if granule == math.inf else int(granule)
    granule_max = max(granule_max, granule)
    windows: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
    if spec.ratio is not None:
        t = target_count(spec.ratio, spec.params_total)
        windows = ((t, t + granule), (t, t + granule_max))
    return Knapsack(
        items=items,
        params_window=windows[0],
        params_window_wide=windows[1],
        kv_cache_min=None if spec.kv_cache_ratio is None else target_count(spec.kv_cache_ratio, spec.kv_cache_bytes_total),
        flops_min=None if spec.flops_ratio is None else target_count(spec.flops_ratio, spec.flops_total),
        constant_loss=constant,
    )


def objective(ks: Knapsack, choice: list[int]) -> float:
    return ks.constant_loss + sum(it.options[j].loss for it, j in zip(ks.items, choice))


def feasible(ks: Knapsack, choice: list[int], window: tuple[int, int] | None) -> bool:
    def total(attr: str) -> int:
        return sum(getattr(it.options[j], attr) for it, j in zip(ks.items, choice))

    return ((window is None or window[0] <= total("params") <= window[1])
            and (ks.kv_cache_min is None or total("kv_cache") >= ks.kv_cache_min)
            and (ks.flops_min is None or total("flops") >= ks.flops_min))


def widths(spec: AllocationSpec, ks: Knapsack, choice: list[int]) -> tuple[list[int], list[int]]:
    g = [s.num_kv_heads for s in spec.layers]
    f = [s.intermediate for s in spec.layers]
    for it, j in zip(ks.items, choice):
        o = it.options[j]
        if it.kind in ("attn", "tied"):
            g[it.layer] = o.kv_groups
        if it.kind in ("mlp", "tied"):
            f[it.layer] = o.mlp
    return g, f


def windows(ks: Knapsack) -> list[tuple[str, tuple[int, int] | None]]:
    if ks.params_window is None:
        return [("none", None)]
    out = [("narrow", ks.params_window)]
    if ks.params_window_wide != ks.params_window:
        out.append(("wide", ks.params_window_wide))
    return out



def choice_for(ks: Knapsack, kv_groups: list[int], mlp: list[int]) -> list[int]:
    """The option index of every item for the per-layer widths ``kv_groups``, ``mlp`` (an allocation's); raises
    InvalidInputError when a width is not one of its item's options."""
    out = []
    for it in ks.items:
        want = (kv_groups[it.layer] if it.kind in ("attn", "tied") else None,
                mlp[it.layer] if it.kind in ("mlp", "tied") else None)
        for j, o in enumerate(it.options):
            if (want[0] is None or o.kv_groups == want[0]) and (want[1] is None or o.mlp == want[1]):
                out.append(j)
                break
        else:
            raise InvalidInputError(f"layer {it.layer}: widths {want} are not an allowed {it.kind} option")
    return out


def result_for(spec: AllocationSpec, base: AllocationResult, kv_groups: list[int], mlp: list[int], *, solver: str,
               objective: float, seconds: float, notes: list[str] | None = None) -> AllocationResult:
    """``base`` (an answer to ``spec``) with the per-layer widths ``kv_groups``, ``mlp``: every count recomputed
    from the layer shapes, the budget window and targets kept."""
    kvb, seq = spec.kv_cache_dtype_bytes, spec.flops_seq_len
    layers = []
    for s, g, f in zip(spec.layers, kv_groups, mlp):
        r = s.num_q_heads // s.num_kv_heads
        layers.append(LayerAllocation(int(g), int(g * r), int(f), 1.0 - g / s.num_kv_heads, 1.0 - f / s.intermediate,
                                      s.params(g, f)))
    after = spec.extra_params + sum(la.params_kept for la in layers)
    layers_before = spec.params_layers
    kv_after = sum(s.kv_cache_bytes(g, kvb) for s, g in zip(spec.layers, kv_groups))
    flops_after = spec.extra_flops + sum(s.flops(g, f, seq) for s, g, f in zip(spec.layers, kv_groups, mlp))
    return dataclasses.replace(
        base, layers=layers, params_after=after, actual_ratio=1.0 - after / spec.params_total,
        actual_ratio_layers=1.0 - (after - spec.extra_params) / layers_before, objective=float(objective),
        solver=solver, solve_seconds=float(seconds), notes=list(base.notes) + list(notes or []),
        kv_cache_bytes_after=kv_after, actual_kv_cache_ratio=1.0 - kv_after / spec.kv_cache_bytes_total,
        flops_after=flops_after, actual_flops_ratio=1.0 - flops_after / spec.flops_total,
        lower_bound=math.nan, proven_optimal=False)


__all__ = ["Item", "Knapsack", "Option", "build_knapsack", "choice_for", "feasible", "objective", "result_for", "widths", "windows"]
