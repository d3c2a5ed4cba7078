"""``MetaPruner``: Torch-Pruning's pruner interface over layerprune's groups and GQA-correct surgery.

It takes the arguments LLM-Pruner's ``llama3.py`` passes to the MetaPruner of its Torch-Pruning fork
(``consecutive_groups``, ``root_instances``, ``ch_sparsity*``) and Torch-Pruning 1.6's spellings
(``pruning_ratio*``, ``out_channel_groups``, ``isomorphic``), and computes the same numbers:

* Local pruning (the default), per group at iterative step ``t``: the root loses
  ``n = current - int(initial * (1 - s_t))`` rows (``s_t`` from the scheduler, linear by default, capped by
  ``max_pruning_ratio``; ``n`` rounded down to ``round_to``), i.e. the ``n // unit`` lowest-scoring units,
  where a unit is ``consecutive_groups`` rows (``head_dim`` for a KV head) and its score is the sum of the
  importance over those rows.
* Global pruning: the unit scores of every group in a scope are ranked together and all units scoring at or
  below the ``k``-th lowest go, ``k = units_now - int(units_initially * (1 - s_t))``. A scope is every group
  whose rate comes from ``pruning_ratio``, or one ``pruning_ratio_dict`` key, or (``isomorphic=True``) all
  KV-group structures and all MLP structures apart.

Groups are built per root without tracing the model (:mod:`layerprune.torch_pruning.groups`), scored by any
``torch_pruning.importance.Importance``, and pruned by :class:`layerprune.pruning.StructuredPruner`: a KV
group goes as a whole (k/v rows of one KV head, the rows of its ``r`` query heads, the o_proj columns), so
the GQA ratio stays intact and the model reloads at any rate. The hidden size is never pruned.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch_pruning.pruner import function
from torch_pruning.pruner.algorithms.scheduler import linear_scheduler

from layerprune.allocation.ratio_dict import (
    ATTENTION,
    MLP,
    OUT_PROJECTIONS,
    Structure,
    check_rate,
    module_names,
    projection_sites,
    rows_to_remove,
    structure_rates,
)
from layerprune.arch import adapter_for, check_consistency
from layerprune.errors import InvalidInputError, NumericalError
from layerprune.pruning import StructuredPruner
from layerprune.scoring.selection import LayerKeep
from layerprune.torch_pruning.groups import GroupBuilder, StructureGroup

DEFAULT_ROOT_MODULE_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.LSTM)  # Torch-Pruning's default
_GROUP_ORDER = {ATTENTION: ("k_proj", "o_proj", "v_proj", "q_proj"), MLP: ("gate_proj", "up_proj", "down_proj")}


@dataclass
class _Site:
    """What the pruner knows of one structure it prunes."""

    structure: Structure
    rate: float
    scope: int | None  # the pruning_ratio_dict key that set the rate; None: pruning_ratio
    unit_rows: int  # root rows per unit: head_dim (a KV head) or the MLP's consecutive group (1)
    initial_rows: int
    schedule: list[float]


class RMSNormPruner(function.BasePruningFunc):
    """A Torch-Pruning pruner for an RMSNorm (one ``[hidden]`` weight), like LLM-Pruner's ``hf_rmsnorm_pruner``.

    ``MetaPruner`` never prunes the hidden size, so it never calls it; scripts that pass it in
    ``customized_pruners`` keep working, and it prunes correctly under Torch-Pruning itself.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(int(i) for i in idxs)
        keep = [i for i in range(layer.weight.shape[0]) if i not in removed]
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[0])

    get_in_channels = get_out_channels


def _one_of(new_name: str, new: Any, old_name: str, old: Any, default: Any) -> Any:
    """Torch-Pruning's two spellings of one argument: either, not two different values."""
    if new is not None and old is not None and new != old:
        raise InvalidInputError(f"{old_name}: {old!r} and {new_name}: {new!r} disagree; pass one of them")
    return default if new is None and old is None else (new if new is not None else old)


def _as_int(value: Any, where: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InvalidInputError(f"{where}: expected an integer >= {low}, got {value!r}")
    return int(value)


class MetaPruner:
    """Drop-in for ``torch_pruning.pruner.MetaPruner`` on supported Llama-family models (module docstring).

    ``example_inputs``, ``forward_fn``, ``output_transform``, ``unwrapped_parameters`` and
    ``enable_index_mapping`` only serve Torch-Pruning's tracing and are accepted unused;
    ``customized_pruners`` may name norms (never called: the hidden size is not pruned). Roots are
    ``root_instances`` plus every module of ``root_module_types``: a q/k/v_proj roots its layer's KV groups,
    a gate/up_proj its MLP channels. Arguments layerprune cannot honour raise InvalidInputError naming them:
    a root whose output channels are the hidden size (or the vocabulary) at a rate above 0, KV groups
    without ``consecutive_groups = head_dim``, a ``channel_groups`` other than the GQA ratio, and
    Torch-Pruning's query-head pruning (``num_heads``, ``prune_num_heads``, ``head_pruning_ratio*``).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any = None,
        importance: Callable[..., Any] | None = None,
        global_pruning: bool = False,
        pruning_ratio: float | None = None,
        pruning_ratio_dict: Mapping[Any, float] | None = None,
        max_pruning_ratio: float | None = None,
        iterative_steps: int = 1,
        iterative_pruning_ratio_scheduler: Callable[[float, int], Sequence[float]] | None = None,
        ignored_layers: Sequence[Any] | None = None,
        round_to: int | None = None,
        isomorphic: bool = False,
        in_channel_groups: Mapping[nn.Module, int] | None = None,
        out_channel_groups: Mapping[nn.Module, int] | None = None,
        num_heads: Mapping[nn.Module, int] | None = None,
        prune_num_heads: bool = False,
        prune_head_dims: bool = True,
        head_pruning_ratio: float = 0.0,
        head_pruning_ratio_dict: Mapping[nn.Module, float] | None = None,
        customized_pruners: Mapping[Any, Any] | None = None,
        unwrapped_parameters: Any = None,
        root_module_types: Sequence[type] | None = DEFAULT_ROOT_MODULE_TYPES,
        forward_fn: Callable[..., Any] | None = None,
        output_transform: Callable[..., Any] | None = None,
        channel_groups: Mapping[nn.Module, int] | int | None = None,
        ch_sparsity: float | None = None,
        ch_sparsity_dict: Mapping[Any, float] | None = None,
        max_ch_sparsity: float | None = None,
        iterative_sparsity_scheduler: Callable[[float, int], Sequence[float]] | None = None,
        consecutive_groups: Mapping[nn.Module, int] | int | None = None,
        root_instances: Sequence[nn.Module] | None = None,
        enable_index_mapping: bool = False,
    ) -> None:
        del example_inputs, forward_fn, output_transform, unwrapped_parameters, enable_index_mapping, prune_head_dims
        self.model = model
        self.adapter = adapter_for(model, "model")
        check_consistency(model)
        if importance is None or not callable(importance):
            raise InvalidInputError("importance: expected a torch_pruning.importance.Importance (a callable on a group)")
        self.importance = importance
        if not isinstance(global_pruning, bool) or not isinstance(isomorphic, bool):
            raise InvalidInputError("global_pruning / isomorphic: expected True or False")
        self.global_pruning, self.isomorphic = global_pruning, isomorphic
        ratio_name = "ch_sparsity" if pruning_ratio is None and ch_sparsity is not None else "pruning_ratio"
        self.pruning_ratio = check_rate(_one_of("pruning_ratio", pruning_ratio, "ch_sparsity", ch_sparsity, 0.5),
                                        ratio_name)
        dict_name = "ch_sparsity_dict" if pruning_ratio_dict is None and ch_sparsity_dict is not None else \
            "pruning_ratio_dict"
        ratio_dict = _one_of("pruning_ratio_dict", pruning_ratio_dict, "ch_sparsity_dict", ch_sparsity_dict, None)
        if ratio_dict is not None and not isinstance(ratio_dict, Mapping):
            raise InvalidInputError(f"{dict_name}: expected a dict {{module: rate}}")
        max_ratio = _one_of("max_pruning_ratio", max_pruning_ratio, "max_ch_sparsity", max_ch_sparsity, 1.0)
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, numbers.Real) or not 0 < max_ratio <= 1:
            raise InvalidInputError(f"max_pruning_ratio: must be a number in (0, 1], got {max_ratio!r}")
        self.max_pruning_ratio = float(max_ratio)
        self.iterative_steps = _as_int(iterative_steps, "iterative_steps")
        self.scheduler = _one_of("iterative_pruning_ratio_scheduler", iterative_pruning_ratio_scheduler,
                                 "iterative_sparsity_scheduler", iterative_sparsity_scheduler, linear_scheduler)
        if not callable(self.scheduler):
            raise InvalidInputError("iterative_pruning_ratio_scheduler: expected a callable (ratio, steps) -> rates")
        self.round_to = None if round_to is None else _as_int(round_to, "round_to")
        if self.round_to is not None and global_pruning:
            raise InvalidInputError("round_to: not supported with global_pruning (it would cut KV heads apart)")
        self._refuse_head_pruning(num_heads, prune_num_heads, head_pruning_ratio, head_pruning_ratio_dict)
        self._check_customized_pruners(customized_pruners)

        self._names = module_names(model)
        self._projection_sites = projection_sites(model)
        self._ignored = self._ignored_ids(ignored_layers)
        self.ignored_layers = [m for m in model.modules() if id(m) in self._ignored]
        self.per_step_pruning_ratio = self._schedule(self.pruning_ratio)
        self._ratio_dict = dict(ratio_dict or {})
        rates = structure_rates(model, self._ratio_dict, self.pruning_ratio, dict_name)
        self._builder = GroupBuilder(model)
        consecutive = self._grouping(consecutive_groups, "consecutive_groups")
        channel = {**self._grouping(channel_groups, "channel_groups"),
                   **self._grouping(out_channel_groups, "out_channel_groups"),
                   **self._grouping(in_channel_groups, "in_channel_groups")}
        self._sites: list[_Site] = []
        for structure in self._roots(root_module_types, root_instances):
            rate, scope = rates[structure]
            unit_rows = self._unit_rows(structure, consecutive, channel)
            self._sites.append(_Site(structure, rate, scope, unit_rows, self._builder.root_rows(structure),
                                     self._schedule(rate)))
        self._scope_initial_units = {}
        for site in self._sites:
            key = self._scope_of(site)
            self._scope_initial_units[key] = self._scope_initial_units.get(key, 0) + site.initial_rows // site.unit_rows
        self.current_step = 0
        self._surgery: StructuredPruner | None = None
        self._history: list[list[Any]] = []
        geometries = [self.adapter.geometry(model, layer) for layer in self.adapter.decoder_layers(model)]
        self._kept = [LayerKeep(tuple(range(g.num_kv_heads)), tuple(range(g.intermediate))) for g in geometries]

    # ---- arguments -------------------------------------------------------------------------------

    @staticmethod
    def _refuse_head_pruning(num_heads, prune_num_heads, head_pruning_ratio, head_pruning_ratio_dict) -> None:
        given = [name for name, value in (("num_heads", num_heads), ("prune_num_heads", prune_num_heads),
                                          ("head_pruning_ratio", head_pruning_ratio),
                                          ("head_pruning_ratio_dict", head_pruning_ratio_dict)) if value]
        if given:
            raise InvalidInputError(
                f"{given[0]}: Torch-Pruning's head pruning removes query heads inside each KV group; layerprune removes "
                "whole KV groups: pass consecutive_groups={k_proj: head_dim} with k_proj roots instead"
            )

    def _check_customized_pruners(self, customized_pruners: Mapping[Any, Any] | None) -> None:
        """Custom pruners may only name modules the surgery never touches (norms): not projections or their parents."""
        if customized_pruners is None:
            return
        if not isinstance(customized_pruners, Mapping):
            raise InvalidInputError("customized_pruners: expected a dict {module type or module: pruner}")
        touched = {id(m) for layer in self.adapter.decoder_layers(self.model) for m in
                   (layer, layer.self_attn, layer.mlp, *self.adapter.projections(layer).values())}
        for key in customized_pruners:
            if isinstance(key, type):
                hits = [m for m in self.model.modules() if isinstance(m, key) and id(m) in touched]
            elif isinstance(key, nn.Module):
                hits = [key] if id(key) in touched else []
            else:
                raise InvalidInputError(f"customized_pruners: keys must be module types or modules, got {key!r}")
            if hits:
                raise InvalidInputError(
                    f"customized_pruners: a pruner for {type(hits[0]).__name__} would replace layerprune's surgery of "
                    f"{module_names(self.model)[id(hits[0])]}; only norms and other modules outside it may have one"
                )

    def _ignored_ids(self, ignored_layers: Sequence[Any] | None) -> set[int]:
        ignored: set[int] = set()
        owners = {id(p): m for m in self.model.modules() for p in m.parameters(recurse=False)}
        for entry in ignored_layers or ():
            if isinstance(entry, nn.Module):
                ignored.update(id(m) for m in entry.modules())
            elif isinstance(entry, nn.Parameter):
                if id(entry) not in owners:
                    raise InvalidInputError("ignored_layers: a Parameter that is not one of this model's")
                ignored.add(id(owners[id(entry)]))
            elif isinstance(entry, type):
                ignored.update(id(m) for m in self.model.modules() if isinstance(m, entry))
            else:
                raise InvalidInputError(f"ignored_layers: expected modules, module types or Parameters, got {entry!r}")
        return ignored

    def _schedule(self, rate: float) -> list[float]:
        rates = list(self.scheduler(rate, self.iterative_steps))
        if len(rates) != self.iterative_steps + 1:
            raise InvalidInputError(f"iterative_pruning_ratio_scheduler: returned {len(rates)} rates for "
                                    f"{self.iterative_steps} steps (expected steps + 1, from step 0)")
        return [check_rate(r, "iterative_pruning_ratio_scheduler") for r in rates]

    def _grouping(self, value: Mapping[nn.Module, int] | int | None, where: str) -> dict[int, tuple[int, str]]:
        """``id(projection) -> (value, where)``; an int applies to every projection (LLM-Pruner's fork)."""
        if value is None:
            return {}
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return {module_id: (_as_int(value, where), where) for module_id in self._projection_sites}
        if not isinstance(value, Mapping):
            raise InvalidInputError(f"{where}: expected a dict {{module: int}} or an int")
        out = {}
        for module, groups in value.items():
            if not isinstance(module, nn.Module) or id(module) not in self._names:
                raise InvalidInputError(f"{where}: keys must be modules of this model, got {type(module).__name__}")
            name = self._names[id(module)]
            if id(module) not in self._projection_sites:
                raise InvalidInputError(f"{where}[{name}]: layerprune groups only the q/k/v/o and gate/up/down projections")
            out[id(module)] = (_as_int(groups, f"{where}[{name}]"), where)
        return out

    def _unit_rows(self, structure: Structure, consecutive: dict[int, tuple[int, str]],
                   channel: dict[int, tuple[int, str]]) -> int:
        """Root rows per unit, from consecutive_groups, after checking every grouping against the layer's shape."""
        layer = self.adapter.decoder_layers(self.model)[structure.layer]
        geometry = self.adapter.geometry(self.model, layer)
        block = layer.self_attn if structure.kind == ATTENTION else layer.mlp
        label = structure.label(self.adapter)
        found = {}
        for projection in _GROUP_ORDER[structure.kind]:
            module = getattr(block, projection)
            if id(module) in consecutive:
                found[projection] = consecutive[id(module)][0]
            if id(module) in channel:
                groups, where = channel[id(module)]
                allowed = {1} if structure.kind == MLP else ({geometry.ratio} if projection in ("q_proj", "o_proj")
                                                              else {1, geometry.ratio})
                if groups not in allowed:
                    detail = ("MLP channels are pruned one by one, without grouping" if structure.kind == MLP else
                              f"the model's GQA ratio is {geometry.ratio} (num_heads {geometry.num_q_heads} / "
                              f"num_key_value_heads {geometry.num_kv_heads})")
                    raise InvalidInputError(f"{where}[{label}.{projection}]: {groups} contradicts the model: {detail}")
        if len(set(found.values())) > 1:
            raise InvalidInputError(f"consecutive_groups: {label} has different values on its projections ({found})")
        value = next(iter(found.values()), None)
        if structure.kind == ATTENTION:
            if value != geometry.head_dim:
                raise InvalidInputError(
                    f"consecutive_groups: {label}.k_proj needs head_dim={geometry.head_dim} (got {value}); layerprune "
                    "removes whole KV groups, so k_proj rows go a head at a time"
                )
            return geometry.head_dim
        value = 1 if value is None else value
        if geometry.intermediate % value:
            raise InvalidInputError(
                f"consecutive_groups: {label} has {geometry.intermediate} channels, not a multiple of {value}")
        return value

    def _roots(self, root_module_types: Sequence[type] | None,
               root_instances: Sequence[nn.Module] | None) -> list[Structure]:
        """The structures to prune, in model order: each root's, once, minus ignored ones (as Torch-Pruning)."""
        types = tuple(root_module_types) if root_module_types is not None else ()
        if not all(isinstance(t, type) for t in types):
            raise InvalidInputError("root_module_types: expected module types (or None)")
        instances = list(root_instances) if root_instances is not None else []
        for module in instances:
            if not isinstance(module, nn.Module) or id(module) not in self._names:
                raise InvalidInputError(f"root_instances: expected modules of this model, got {type(module).__name__}")
        if not types and not instances:
            raise InvalidInputError("root_instances: nothing to prune (no root_instances and root_module_types=None)")
        instance_ids = {id(m) for m in instances}
        structures: list[Structure] = []
        for module in self.model.modules():
            by_type, by_instance = isinstance(module, types), id(module) in instance_ids
            if not (by_type or by_instance) or id(module) in self._ignored:
                continue
            site = self._projection_sites.get(id(module))
            if site is None or not site.out_channels:
                if by_type and not any(True for _ in module.parameters(recurse=False)):
                    continue  # a parameterless module of a root type: Torch-Pruning has no channels to prune there
                self._refuse_root(module, "root_instances" if by_instance else "root_module_types")
                continue
            if site.structure in structures:
                continue
            block = self.adapter.decoder_layers(self.model)[site.structure.layer]
            block = block.self_attn if site.structure.kind == ATTENTION else block.mlp
            if any(id(getattr(block, p)) in self._ignored for p in OUT_PROJECTIONS[site.structure.kind]):
                continue
            structures.append(site.structure)
        return structures

    def _refuse_root(self, module: nn.Module, where: str) -> None:
        """A root outside the structures is harmless only at rate 0 (its rate: the last dictionary key containing it)."""
        rate = self.pruning_ratio
        for key, value in self._ratio_dict.items():
            members = key if isinstance(key, tuple) else (key,)
            if any(module is sub for m in members for sub in m.modules()):
                rate = value
        if rate == 0:
            return
        name = self._names[id(module)]
        contains_projections = any(id(sub) in self._projection_sites for sub in module.modules())
        if id(module) not in self._projection_sites and contains_projections:
            raise InvalidInputError(f"{where}: {name} is not a projection; roots are q/k/v_proj (KV groups) or "
                                    "gate/up_proj (MLP channels)")
        raise InvalidInputError(
            f"{where}: {name} ({type(module).__name__}) would root a group of its output channels, the hidden size "
            "(or the vocabulary), which layerprune does not prune; pass root_module_types=None with "
            "root_instances=[k_proj, gate_proj, ...] or add it to ignored_layers"
        )

    def _scope_of(self, site: _Site) -> Any:
        if site.scope is not None:
            return ("key", site.scope) if self.global_pruning else ("local", site.structure)
        if self.isomorphic:
            return ("isomorphic", site.structure.kind)
        return ("default",) if self.global_pruning else ("local", site.structure)

    # ---- Torch-Pruning interface ------------------------------------------------------------------

    def get_all_groups(self) -> list[StructureGroup]:
        """The full group of every structure this pruner prunes, on the model's current shapes."""
        return [self._builder.group(site.structure) for site in self._sites]

    def estimate_importance(self, group: StructureGroup) -> Any:
        return self.importance(group)

    def get_target_pruning_ratio(self, module: nn.Module, step: int = -1) -> float:
        """The rate of the structure ``module`` belongs to at ``step`` (default: the current step)."""
        step = self.current_step if step < 0 else step
        site = self._projection_sites.get(id(module))
        for candidate in self._sites:
            if site is not None and candidate.structure == site.structure:
                return min(candidate.schedule[step], self.max_pruning_ratio)
        return min(self.per_step_pruning_ratio[step], self.max_pruning_ratio)

    def reset(self) -> None:
        self.current_step = 0

    def regularize(self, model: nn.Module, loss: Any) -> None:
        """Torch-Pruning's hook for sparse training; MetaPruner has none."""

    def update_regularizer(self) -> None:
        """Torch-Pruning's hook for sparse training; MetaPruner has none."""

    def pruning_history(self) -> list[list[Any]]:
        """``[root name, True, removed root rows]`` per pruned group, in order (Torch-Pruning's format)."""
        return [list(entry) for entry in self._history]

    def load_pruning_history(self, history: Sequence[Sequence[Any]]) -> None:
        """Replay :meth:`pruning_history` (of a pruner on an identical model) on this pruner's model."""
        by_name = {site.name: site.structure for site in self._projection_sites.values()}
        for entry in history:
            if len(entry) != 3 or entry[0] not in by_name or entry[1] is not True:
                raise InvalidInputError(f"history: {entry!r} is not a [k_proj or gate_proj name, True, rows] entry")
            self._prune_rows(by_name[entry[0]], list(entry[2]))

    def kept(self) -> list[LayerKeep]:
        """Per layer, the KV heads and MLP channels kept so far, as indices of the model given to the pruner."""
        return list(self._kept)

    def step(self, interactive: bool = False) -> Generator[StructureGroup, None, None] | None:
        """One iterative step: score every group, then prune (``interactive=True``: yield the groups instead,
        each removed by its ``group.prune()``)."""
        self.current_step += 1
        if interactive:
            return self._interactive()
        if self.current_step > self.iterative_steps:
            warnings.warn("Pruning exceed the maximum iterative steps, no pruning will be performed.", stacklevel=2)
            return None
        self._apply(self._decide())
        return None

    # ---- the step --------------------------------------------------------------------------------

    def _interactive(self) -> Generator[StructureGroup, None, None]:
        if self.current_step > self.iterative_steps:
            warnings.warn("Pruning exceed the maximum iterative steps, no pruning will be performed.", stacklevel=2)
            return
        for site, units in self._decide():
            rows = [u * site.unit_rows + d for u in units for d in range(site.unit_rows)]
            yield self._builder.group(site.structure, rows, on_prune=self._prune_rows)

    def _prunable(self, site: _Site) -> bool:
        """Torch-Pruning's check: no projection of the group below ``initial * (1 - max_pruning_ratio)`` or at 1."""
        rows = self._builder.root_rows(site.structure)
        return not (rows < site.initial_rows * (1 - self.max_pruning_ratio) or rows == 1)

    def _unit_scores(self, site: _Site) -> torch.Tensor | None:
        group = self._builder.group(site.structure)
        rows = len(group[0].idxs)
        try:
            scores = self.estimate_importance(group)
        except AttributeError:
            if any(dep.target.module.weight.grad is None for dep, _ in group):
                raise InvalidInputError(f"importance: {type(self.importance).__name__} needs gradients and "
                                        f"{site.structure.label(self.adapter)} has none: run loss.backward() "
                                        "before step()") from None
            raise
        if scores is None:
            return None
        label = site.structure.label(self.adapter)
        scores = torch.as_tensor(scores).detach().flatten().to("cpu", torch.float64)
        if scores.numel() > rows and not bool((scores[rows:] == 0).all()):
            raise InvalidInputError(f"importance: returned {scores.numel()} scores for the {rows} root rows of {label}")
        # Torch-Pruning's reduction sizes its output by the first scored item: when an importance skips the root
        # (activation importances score o_proj inputs only), the root rows come first and the rest stay 0.
        scores = scores[:rows]
        if scores.numel() != rows:
            raise InvalidInputError(f"importance: returned {scores.numel()} scores for the {rows} root rows of {label}")
        if not bool(torch.isfinite(scores).all()):
            raise NumericalError(f"importance: non-finite scores for {label} (NaN/inf weights or gradients?)")
        return scores.view(-1, site.unit_rows).sum(1)

    def _decide(self) -> list[tuple[_Site, list[int]]]:
        """Units to remove per structure this step (lowest scores first; ties remove the higher index)."""
        step = self.current_step
        scored = [(site, scores) for site in self._sites if self._prunable(site)
                  for scores in [self._unit_scores(site)] if scores is not None]
        decisions: list[tuple[_Site, list[int]]] = []
        scopes: dict[Any, list[tuple[_Site, torch.Tensor]]] = {}
        for site, scores in scored:
            scopes.setdefault(self._scope_of(site), []).append((site, scores))
        for scope, members in scopes.items():
            if scope[0] == "local":
                site, scores = members[0]
                rate = min(site.schedule[step], self.max_pruning_ratio)
                rows = rows_to_remove(self._builder.root_rows(site.structure), site.initial_rows, rate)
                if self.round_to:
                    rows -= rows % self.round_to
                count = rows // site.unit_rows
                if count > 0:
                    decisions.append((site, self._lowest(site, scores, count)))
                continue
            rate = self._scope_rate(members[0][0], step)
            everything = torch.cat([scores for _, scores in members])
            count = everything.numel() - int(self._scope_initial_units[scope] * (1 - rate))
            if count <= 0:
                continue
            threshold = torch.sort(everything).values[count - 1]
            for site, scores in members:
                units = [int(u) for u in torch.nonzero(scores <= threshold).flatten()]
                if units:
                    decisions.append((site, self._checked(site, units, scores.numel())))
        decisions.sort(key=lambda d: d[0].structure)
        return decisions

    def _scope_rate(self, site: _Site, step: int) -> float:
        rates = site.schedule if site.scope is not None else self.per_step_pruning_ratio
        return min(rates[step], self.max_pruning_ratio)

    def _lowest(self, site: _Site, scores: torch.Tensor, count: int) -> list[int]:
        order = sorted(range(scores.numel()), key=lambda u: (float(scores[u]), -u))
        return self._checked(site, sorted(order[:count]), scores.numel())

    def _checked(self, site: _Site, units: list[int], total: int) -> list[int]:
        if len(units) >= total:
            what = "KV groups" if site.structure.kind == ATTENTION else "MLP channels"
            raise InvalidInputError(
                f"pruning_ratio: step {self.current_step} would remove all {total} {what} of "
                f"{site.structure.label(self.adapter)} (Torch-Pruning skips such a group silently); lower the rate "
                "or list the layer in ignored_layers"
            )
        return units

    # ---- surgery ---------------------------------------------------------------------------------

    def _prune_rows(self, structure: Structure, rows: list[int]) -> None:
        """Remove root ``rows`` of one structure (a yielded group's ``prune()``, or a replayed history entry)."""
        layer = self.adapter.decoder_layers(self.model)[structure.layer]
        unit_rows = self.adapter.geometry(self.model, layer).head_dim if structure.kind == ATTENTION else 1
        units = self._builder.whole_units(structure, rows, unit_rows)
        self._apply([(structure, units)])

    def _apply(self, decisions: Sequence[tuple[Any, list[int]]]) -> None:
        """One pass of layerprune's surgery for all decisions: ``(site or structure, removed units)``."""
        if not decisions:
            return
        layers = self.adapter.decoder_layers(self.model)
        geometries = [self.adapter.geometry(self.model, layer) for layer in layers]
        removed: dict[Structure, set[int]] = {}
        for owner, units in decisions:
            structure = owner.structure if isinstance(owner, _Site) else owner
            unit_rows = owner.unit_rows if isinstance(owner, _Site) and structure.kind == MLP else 1
            removed.setdefault(structure, set()).update(u * unit_rows + d for u in units for d in range(unit_rows))
        keep = []
        for index, geometry in enumerate(geometries):
            gone_kv = removed.get(Structure(index, ATTENTION), set())
            gone_mlp = removed.get(Structure(index, MLP), set())
            keep.append(LayerKeep(tuple(j for j in range(geometry.num_kv_heads) if j not in gone_kv),
                                  tuple(c for c in range(geometry.intermediate) if c not in gone_mlp)))
        if self._surgery is None:
            self._surgery = StructuredPruner(self.model)
        self._surgery.prune(keep)
        for structure, gone in sorted(removed.items()):
            geometry = geometries[structure.layer]
            rows = sorted(gone) if structure.kind == MLP else \
                [j * geometry.head_dim + d for j in sorted(gone) for d in range(geometry.head_dim)]
            root = "self_attn.k_proj" if structure.kind == ATTENTION else "mlp.gate_proj"
            self._history.append([f"{self.adapter.layer_prefix(structure.layer)}.{root}", True, rows])
        self._kept = [LayerKeep(tuple(old.kv_heads[j] for j in new.kv_heads),
                                tuple(old.mlp_channels[c] for c in new.mlp_channels))
                      for old, new in zip(self._kept, keep)]


BasePruner = MetaPruner  # Torch-Pruning 1.6's name of the same class

__all__ = ["DEFAULT_ROOT_MODULE_TYPES", "BasePruner", "MetaPruner", "RMSNormPruner"]
