"""Torch-Pruning groups of one layerprune structure, built from the layer's shapes without tracing the model.

A Torch-Pruning group is a list of ``(Dependency, idxs)`` items whose first item is the root; every item has
``root_idxs``, the root index each of its indices belongs to, and importances reduce the items' scores onto
the root's indices with them (``scatter_add`` by ``root_idxs``). The groups built here hold the real
projections only (no tracing ops), in the order Torch-Pruning's traversal gives them:

* KV groups, rooted at ``k_proj`` rows: ``k_proj`` (out), ``o_proj`` (in), ``v_proj`` (out), ``q_proj`` (out).
  Under GQA (``r = Hq / Hkv``) q row ``h*hd + d`` and o_proj column ``h*hd + d`` belong to k row
  ``(h // r)*hd + d`` (:mod:`layerprune.arch.gqa`), so the reduction folds the r query heads of a KV head
  onto it. With ``r = 1`` this is exactly ``DependencyGraph.get_pruning_group(k_proj, ...)`` restricted to
  the projections.
* MLP channels, rooted at ``gate_proj`` rows: ``gate_proj`` (out), ``up_proj`` (out), ``down_proj`` (in),
  index for index.

Biases go with their rows (importances with ``bias=True`` read them). Per-head q/k norms (Qwen3) are shared
by every head and never in a group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torch_pruning import _helpers
from torch_pruning.dependency import Dependency, Group, Node
from torch_pruning.pruner import function

from layerprune.allocation.ratio_dict import ATTENTION, Structure, module_names
from layerprune.arch import adapter_for, gqa
from layerprune.errors import InternalError, InvalidInputError

OUT = function.prune_linear_out_channels
IN = function.prune_linear_in_channels


class StructureGroup(Group):
    """A Torch-Pruning group of one structure; :meth:`prune` removes its rows through layerprune's surgery."""

    def __init__(self, structure: Structure, on_prune: Callable[[Structure, list[int]], None] | None) -> None:
        super().__init__()
        self.structure = structure
        self._on_prune = on_prune

    def add_item(self, dep: Dependency, idxs: list[int], root_idxs: list[int]) -> None:
        item = _helpers.GroupItem(dep=dep, idxs=idxs)
        item.root_idxs = root_idxs
        self._group.append(item)

    def prune(self, idxs: Sequence[int] | None = None, record_history: bool = True) -> None:
        """Remove the group's root rows (or ``idxs``, root rows too): whole KV heads of k_proj, or channels."""
        if self._on_prune is None:
            raise InvalidInputError("group: built for scoring only; prune through MetaPruner.step()")
        rows = list(self[0].idxs) if idxs is None else [int(i) for i in idxs]
        self._on_prune(self.structure, rows)


class GroupBuilder:
    """Builds the groups of one model's structures; one Torch-Pruning node per projection, reused across steps."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self._layers = self.adapter.decoder_layers(model)
        self._names = module_names(model)
        self._nodes: dict[int, Node] = {}

    def node(self, module: nn.Module) -> Node:
        found = self._nodes.get(id(module))
        if found is None:
            found = self._nodes[id(module)] = Node(module, grad_fn=None, name=self._names[id(module)])
        return found

    def root_rows(self, structure: Structure) -> int:
        """Rows of the structure's root now: ``k_proj`` out features or ``gate_proj`` out features."""
        layer = self._layers[structure.layer]
        return layer.self_attn.k_proj.out_features if structure.kind == ATTENTION else layer.mlp.gate_proj.out_features

    def group(self, structure: Structure, rows: Sequence[int] | None = None,
              on_prune: Callable[[Structure, list[int]], None] | None = None) -> StructureGroup:
        """The group of ``structure`` over root ``rows`` (all of them by default), with its coupled projections."""
        layer = self._layers[structure.layer]
        rows = list(range(self.root_rows(structure))) if rows is None else sorted(int(r) for r in rows)
        if len(set(rows)) != len(rows) or (rows and not 0 <= rows[0] <= rows[-1] < self.root_rows(structure)):
            raise InvalidInputError(f"idxs: root rows of {structure.label(self.adapter)} must be unique and in "
                                    f"0..{self.root_rows(structure) - 1}")
        if structure.kind == ATTENTION:
            attn = layer.self_attn
            geometry = self.adapter.geometry(self.model, layer)
            members = ((attn.k_proj, OUT), (attn.o_proj, IN), (attn.v_proj, OUT), (attn.q_proj, OUT))
            hd, ratio = geometry.head_dim, geometry.ratio
            wanted = set(rows)
            group_of = gqa.kv_group_of_query_head(geometry.num_q_heads, ratio)
            query_rows, query_roots = [], []
            for q_row in range(geometry.num_q_heads * hd):
                root = group_of[q_row // hd] * hd + q_row % hd
                if root in wanted:
                    query_rows.append(q_row)
                    query_roots.append(root)
            index_sets = (rows, query_rows, rows, query_rows)
            root_sets = (rows, query_roots, rows, query_roots)
        else:
            mlp = layer.mlp
            members = ((mlp.gate_proj, OUT), (mlp.up_proj, OUT), (mlp.down_proj, IN))
            index_sets = root_sets = (rows, rows, rows)
        root_node = self.node(members[0][0])
        group = StructureGroup(structure, on_prune)
        for (module, handler), idxs, roots in zip(members, index_sets, root_sets):
            dependency = Dependency(OUT, handler, source=root_node, target=self.node(module))
            group.add_item(dependency, list(idxs), list(roots))
        return group

    def whole_units(self, structure: Structure, rows: Sequence[int], unit_rows: int) -> list[int]:
        """The units (KV heads, channel blocks) that ``rows`` of the root cover exactly; an error otherwise."""
        units = sorted({int(r) // unit_rows for r in rows})
        if sorted(set(int(r) for r in rows)) != [u * unit_rows + d for u in units for d in range(unit_rows)]:
            what = "whole KV heads (head_dim rows of k_proj each)" if structure.kind == ATTENTION else \
                f"whole blocks of {unit_rows} channels"
            raise InvalidInputError(
                f"idxs: {structure.label(self.adapter)} prunes {what}; the rows given cover part of one")
        if not units:
            raise InternalError("whole_units: no rows")
        return units


__all__ = ["GroupBuilder", "StructureGroup"]
