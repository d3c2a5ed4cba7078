"""Per-layer plans as Torch-Pruning rate dictionaries, and back.

Torch-Pruning (and LLM-Pruner's fork of it, which its ``llama3.py`` imports) takes per-module pruning rates,
``pruning_ratio_dict`` / ``ch_sparsity_dict``: ``{module: rate}``, a rate applying to every projection inside
the module. layerprune prunes two structures per decoder layer, its KV groups (``k_proj`` rows in heads of
``head_dim``, with the coupled q/v rows and o_proj columns) and its MLP channels (gate/up rows, down_proj
columns). A rate reaches a structure through the projections whose output channels the structure removes
(q/k/v_proj; gate/up_proj). o_proj, down_proj, the norms, the embeddings and ``lm_head`` carry the hidden
size (or the vocabulary) as output channels, which layerprune never prunes.

Torch-Pruning turns a rate ``s`` into a count on the group's root (``k_proj`` / ``gate_proj``) at every
iterative step: it removes ``current - int(initial * (1 - s))`` rows, in whole units of ``unit_rows``
consecutive rows (``consecutive_groups``: ``head_dim`` for a KV head, 1 for a channel). After the last step
a structure of ``n`` units therefore keeps ``ceil(int(n * unit_rows * (1 - s)) / unit_rows)`` of them,
whatever the schedule (:func:`kept_units`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from layerprune.allocation.solve import AllocationResult, LayerAllocation
from layerprune.arch import adapter_for, layer_geometries
from layerprune.arch.budget import LayerShape
from layerprune.errors import InternalError, InvalidInputError

if TYPE_CHECKING:  # torch is imported inside the one function that needs it at run time
    from torch import nn

ATTENTION = "attention"
MLP = "mlp"
# Projections whose output channels a structure removes; the others lose input columns.
OUT_PROJECTIONS = {ATTENTION: ("q_proj", "k_proj", "v_proj"), MLP: ("gate_proj", "up_proj")}
IN_PROJECTIONS = {ATTENTION: ("o_proj",), MLP: ("down_proj",)}
# The root of each structure in the dictionaries written here (LLM-Pruner's root_instances).
ROOT_PROJECTION = {ATTENTION: "k_proj", MLP: "gate_proj"}


@dataclass(frozen=True, order=True)
class Structure:
    """One prunable structure of decoder layer ``layer``: its KV groups (``attention``) or MLP channels."""

    layer: int
    kind: str

    def label(self, adapter: Any) -> str:
        block = "self_attn" if self.kind == ATTENTION else "mlp"
        return f"{adapter.layer_prefix(self.layer)}.{block}"


@dataclass(frozen=True)
class ProjectionSite:
    """Where a projection sits: its structure, qualified name, and whether the structure removes its rows."""

    structure: Structure
    name: str
    projection: str
    out_channels: bool


def projection_sites(model: nn.Module) -> dict[int, ProjectionSite]:
    """``id(module) -> ProjectionSite`` for the seven projections of every decoder layer."""
    adapter = adapter_for(model)
    sites = {}
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for kind, block in ((ATTENTION, layer.self_attn), (MLP, layer.mlp)):
            prefix = f"{adapter.layer_prefix(index)}.{'self_attn' if kind == ATTENTION else 'mlp'}"
            for out, names in ((True, OUT_PROJECTIONS[kind]), (False, IN_PROJECTIONS[kind])):
                for projection in names:
                    sites[id(getattr(block, projection))] = ProjectionSite(
                        Structure(index, kind), f"{prefix}.{projection}", projection, out)
    return sites


def root_module(model: nn.Module, structure: Structure) -> nn.Linear:
    """The structure's root projection: ``k_proj`` (KV groups) or ``gate_proj`` (MLP channels)."""
    layer = adapter_for(model).decoder_layers(model)[structure.layer]
    block = layer.self_attn if structure.kind == ATTENTION else layer.mlp
    return getattr(block, ROOT_PROJECTION[structure.kind])


def check_rate(value: Any, where: str) -> float:
    """A pruning rate: a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
        raise InvalidInputError(f"{where}: a pruning rate must be a number in [0, 1), got {value!r}")
    return float(value)


def module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): (name or "the model") for name, m in model.named_modules()}


def structure_rates(
    model: nn.Module,
    pruning_ratio_dict: Mapping[Any, Any] | None,
    pruning_ratio: float = 0.0,
    where: str = "pruning_ratio_dict",
) -> dict[Structure, tuple[float, int | None]]:
    """``structure -> (rate, index of the dictionary key that set it, or None for pruning_ratio)``.

    As in Torch-Pruning, a key (a module, or a tuple of modules sharing one rate) applies its rate to every
    projection inside it, and a later key overrides an earlier one for the projections both contain. The
    projections of one structure must end with one rate; a key that reaches only hidden-size modules
    (o_proj, down_proj, norms, embeddings, lm_head) is refused: layerprune does not prune the hidden size.
    """
    from torch import nn

    default = check_rate(pruning_ratio, "pruning_ratio")
    sites = projection_sites(model)
    names = module_names(model)
    per_projection: dict[int, tuple[float, int]] = {}
    for index, (key, value) in enumerate((pruning_ratio_dict or {}).items()):
        members = key if isinstance(key, tuple) else (key,)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise InvalidInputError(f"{where}: keys must be modules of the model (or tuples of them), got {key!r}")
        for member in members:
            if id(member) not in names:
                raise InvalidInputError(f"{where}: {type(member).__name__} key is not a module of this model")
        label = ", ".join(names[id(m)] for m in members)
        rate = check_rate(value, f"{where}[{label}]")
        reached = [id(sub) for m in members for sub in m.modules() if id(sub) in sites and sites[id(sub)].out_channels]
        if not reached:
            raise InvalidInputError(
                f"{where}[{label}]: contains no q/k/v_proj or gate/up_proj, so its rate would prune the hidden size "
                "(or the vocabulary), which layerprune does not prune; key the rate on k_proj, gate_proj or the layer"
            )
        for module_id in reached:
            per_projection[module_id] = (rate, index)
    adapter = adapter_for(model)
    out: dict[Structure, tuple[float, int | None]] = {}
    for index in range(len(adapter.decoder_layers(model))):
        for kind in (ATTENTION, MLP):
            out[Structure(index, kind)] = (default, None)
    seen: dict[Structure, str] = {}
    for module_id, (rate, key_index) in per_projection.items():
        site = sites[module_id]
        if site.structure in seen and out[site.structure][0] != rate:
            raise InvalidInputError(
                f"{where}: {seen[site.structure]} ({out[site.structure][0]}) and {site.name} ({rate}) are coupled in "
                f"{site.structure.label(adapter)} and must share one rate"
            )
        out[site.structure] = (rate, key_index)
        seen[site.structure] = site.name
    return out


def rows_to_remove(current: int, initial: int, rate: float) -> int:
    """Rows a root of ``current`` (originally ``initial``) rows loses at ``rate``: ``current - int(initial * (1 - rate))``."""
    return current - int(initial * (1 - rate))


def kept_units(units: int, unit_rows: int, rate: float) -> int:
    """Units a structure of ``units`` units keeps after the last step at ``rate`` (module docstring)."""
    rows = units * unit_rows
    return math.ceil(int(rows * (1 - rate)) / unit_rows)


def _rate_for(units: int, unit_rows: int, kept: int) -> float:
    """A rate that keeps exactly ``kept`` of ``units``: the plain fraction when it lands, else a safe midpoint."""
    for rate in ((units - kept) / units, 1 - (kept * unit_rows + 0.5) / (units * unit_rows)):
        if 0 <= rate < 1 and kept_units(units, unit_rows, rate) == kept:
            return rate
    raise InternalError(f"no pruning rate keeps {kept} of {units} units of {unit_rows} rows")


def to_pruning_ratio_dict(model: nn.Module, allocation: AllocationResult) -> dict[nn.Module, float]:
    """The ``pruning_ratio_dict`` (``ch_sparsity_dict``) that makes a MetaPruner reproduce ``allocation``.

    Keys are every layer's ``self_attn.k_proj`` and ``mlp.gate_proj`` (pass them as ``root_instances`` too),
    in layer order; a structure the allocation keeps whole gets 0.0. With ``consecutive_groups={k_proj:
    head_dim}`` each layer then keeps exactly ``kv_groups_kept`` KV groups and ``mlp_kept`` channels, after
    one step or after ``iterative_steps`` on the linear schedule. ``model`` is the model the allocation was
    computed for, with its current widths.
    """
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    planned = getattr(allocation, "layers", None)
    if planned is None:
        raise InvalidInputError(f"allocation: expected an AllocationResult, got {type(allocation).__name__}")
    if len(planned) != len(layers):
        raise InvalidInputError(f"allocation: has {len(planned)} layers, the model has {len(layers)}")
    out: dict[Any, float] = {}
    for index, (layer, geometry, plan) in enumerate(zip(layers, layer_geometries(model), planned)):
        for kind, units, unit_rows, kept, block in (
            (ATTENTION, geometry.num_kv_heads, geometry.head_dim, plan.kv_groups_kept, layer.self_attn),
            (MLP, geometry.intermediate, 1, plan.mlp_kept, layer.mlp),
        ):
            what = "kv_groups_kept" if kind == ATTENTION else "mlp_kept"
            if isinstance(kept, bool) or not isinstance(kept, numbers.Integral) or not 1 <= kept <= units:
                raise InvalidInputError(f"allocation.layers[{index}].{what}: {kept!r} is not in 1..{units}")
            out[getattr(block, ROOT_PROJECTION[kind])] = _rate_for(units, unit_rows, int(kept))
    return out


def _layer_shape(adapter: Any, config: Any, geometry: Any) -> LayerShape:
    dense = adapter.layer_shape(config)
    return LayerShape(dense.hidden, geometry.num_q_heads, geometry.num_kv_heads, geometry.head_dim,
                      geometry.intermediate, qkv_bias=dense.qkv_bias, o_bias=dense.o_bias, mlp_bias=dense.mlp_bias, qk_norm=dense.qk_norm,
                      norm_params=dense.norm_params, group_norm=dense.group_norm)


def from_pruning_ratio_dict(
    model: nn.Module,
    pruning_ratio_dict: Mapping[Any, Any] | None,
    pruning_ratio: float = 0.0,
) -> AllocationResult:
    """The per-layer plan a rate dictionary describes, as an :class:`AllocationResult` (the inverse of
    :func:`to_pruning_ratio_dict`).

    Rates resolve as in :func:`structure_rates` (``pruning_ratio`` for structures no key reaches) and become
    counts as a local MetaPruner makes them, KV groups in units of ``head_dim`` rows of ``k_proj``
    (:func:`kept_units`), from the model's current widths. ``params_before`` / ``params_after`` and the
    ratios are exact (the family's budget formula). Feed it to layerprune's pruner with
    ``select_keep(kv_scores, channel_scores, [l.kv_groups_kept ...], [l.mlp_kept ...])`` and
    :class:`layerprune.pruning.StructuredPruner`.
    """
    adapter = adapter_for(model)
    rates = structure_rates(model, pruning_ratio_dict, pruning_ratio)
    geometries = layer_geometries(model)
    plans, before, after = [], 0, 0
    for index, geometry in enumerate(geometries):
        attn_rate, mlp_rate = rates[Structure(index, ATTENTION)][0], rates[Structure(index, MLP)][0]
        groups = kept_units(geometry.num_kv_heads, geometry.head_dim, attn_rate)
        channels = kept_units(geometry.intermediate, 1, mlp_rate)
        for kind, kept, rate in ((ATTENTION, groups, attn_rate), (MLP, channels, mlp_rate)):
            if kept < 1:
                what = "KV group" if kind == ATTENTION else "MLP channel"
                raise InvalidInputError(
                    f"pruning_ratio_dict: rate {rate} removes every {what} of {Structure(index, kind).label(adapter)}")
        shape = _layer_shape(adapter, model.config, geometry)
        kept_params = shape.params(groups, channels)
        before += shape.params()
        after += kept_params
        plans.append(LayerAllocation(groups, groups * geometry.ratio, channels, 1 - groups / geometry.num_kv_heads,
                                     1 - channels / geometry.intermediate, kept_params))
    extra = adapter.extra_params(model.config)
    return AllocationResult(
        layers=plans,
        params_before=before + extra,
        params_after=after + extra,
        actual_ratio=1 - (after + extra) / (before + extra),
        actual_ratio_layers=1 - after / before,
        objective=0.0,
        solver="pruning_ratio_dict",
        solve_seconds=0.0,
        binding=[],
        notes=["counts from a Torch-Pruning rate dictionary (local pruning, k_proj rows in heads of head_dim)"],
    )


__all__ = [
    "ATTENTION",
    "IN_PROJECTIONS",
    "MLP",
    "OUT_PROJECTIONS",
    "ROOT_PROJECTION",
    "ProjectionSite",
    "Structure",
    "check_rate",
    "from_pruning_ratio_dict",
    "kept_units",
    "projection_sites",
    "root_module",
    "rows_to_remove",
    "structure_rates",
    "to_pruning_ratio_dict",
]
