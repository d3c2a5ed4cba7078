"""Structured pruning mechanics for Llama-family models: remove whole KV groups and MLP channels.

What is removed, per decoder layer (GQA ratio r = num_heads // num_kv_heads, head size hd):

* KV group j: k_proj / v_proj rows j*hd .. (j+1)*hd-1, the rows of its r query heads r*j .. r*j+r-1 in q_proj,
  and the matching o_proj input columns. r stays the same, so every kept query head still reads its own KV head.
* MLP channel c: gate_proj row c, up_proj row c, down_proj column c.

The residual width (hidden size) and the RMSNorm weights are never touched, so layers are independent.

The tensor surgery is done by Torch-Pruning (Fang et al., "DepGraph", CVPR 2023). The MLP uses the dependency
group rooted at gate_proj (out channels), which couples gate/up rows with down_proj columns. For attention the
group rooted at k_proj maps KV rows one-to-one onto q_proj rows, which is wrong under GQA, so the index sets are
computed here and applied with `tp.prune_linear_out_channels` / `tp.prune_linear_in_channels`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from layerprune.errors import InternalError, InvalidInputError, ModelError

__all__ = [
    "LayerKeep",
    "LlamaStructuredPruner",
    "check_consistency",
    "layer_shapes",
    "masked_dense_forward",
    "prune_llama",
    "select_keep",
]


@dataclass(frozen=True)
class LayerKeep:
    """Indices KEPT in one decoder layer (sorted, unique): KV heads and MLP channels."""

    kv_heads: tuple[int, ...]
    mlp_channels: tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------------
# Model access helpers


def _decoder_layers(model: nn.Module) -> list[Any]:
    """The decoder layers of a LlamaForCausalLM-like model (model.model.layers) or a bare LlamaModel (model.layers)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError("model: expected a Llama-like model with `model.layers` (decoder layers)")
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        names_attn = ("q_proj", "k_proj", "v_proj", "o_proj")
        names_mlp = ("gate_proj", "up_proj", "down_proj")
        if attn is None or mlp is None or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names_attn) \
                or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in names_mlp):
            raise ModelError(f"model.layers[{i}]: expected self_attn.{{q,k,v,o}}_proj and mlp.{{gate,up,down}}_proj Linear layers")
    return list(layers)


def _head_dim(attn: Any, layer_index: int) -> int:
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ModelError(f"model.layers[{layer_index}].self_attn: missing a positive integer `head_dim`")
    return head_dim


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer, read from the actual weight shapes: num_q_heads, num_kv_heads, head_dim, intermediate."""
    shapes = []
    for i, layer in enumerate(_decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = _head_dim(attn, i)
        shapes.append(
            {
                "num_q_heads": attn.q_proj.weight.shape[0] // head_dim,
                "num_kv_heads": attn.k_proj.weight.shape[0] // head_dim,
                "head_dim": head_dim,
                "intermediate": mlp.gate_proj.weight.shape[0],
            }
        )
    return shapes


def check_consistency(model: nn.Module) -> None:
    """Raise InternalError if any layer's shapes disagree.

    Attention: q rows = r * k rows = r * v rows with one integer r >= 1 shared by all layers, rows multiples of
    head_dim, o_proj columns = q rows, input widths and o_proj rows = hidden size. MLP: gate rows = up rows =
    down columns, gate/up columns and down rows = hidden size. Biases match their weights.
    """
    layers = _decoder_layers(model)
    ratio = None
    hidden = None
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = _head_dim(attn, i)
        q, k, v, o = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight)
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        where = f"model.layers[{i}]"
        if hidden is None:
            hidden = q.shape[1]
        for name, w, dim in (("q_proj", q, 1), ("k_proj", k, 1), ("v_proj", v, 1), ("o_proj", o, 0),
                             ("gate_proj", gate, 1), ("up_proj", up, 1), ("down_proj", down, 0)):
            if w.shape[dim] != hidden:
                raise InternalError(f"{where}: {name} weight {tuple(w.shape)} does not match hidden size {hidden}")
        if k.shape[0] == 0 or k.shape[0] % head_dim or q.shape[0] % head_dim:
            raise InternalError(f"{where}: q rows {q.shape[0]} / k rows {k.shape[0]} are not positive multiples of head_dim {head_dim}")
        if v.shape[0] != k.shape[0]:
            raise InternalError(f"{where}: v_proj rows {v.shape[0]} != k_proj rows {k.shape[0]}")
        if q.shape[0] % k.shape[0]:
            raise InternalError(f"{where}: q_proj rows {q.shape[0]} are not a multiple of k_proj rows {k.shape[0]}")
        layer_ratio = q.shape[0] // k.shape[0]
        if ratio is None:
            ratio = layer_ratio
        elif layer_ratio != ratio:
            raise InternalError(f"{where}: GQA ratio {layer_ratio} differs from layer 0's {ratio}")
        groups = getattr(attn, "num_key_value_groups", None)
        if groups is not None and groups != layer_ratio:
            raise InternalError(f"{where}: self_attn.num_key_value_groups={groups} but weights give ratio {layer_ratio}")
        if o.shape[1] != q.shape[0]:
            raise InternalError(f"{where}: o_proj columns {o.shape[1]} != q_proj rows {q.shape[0]}")
        if not (gate.shape[0] == up.shape[0] == down.shape[1]) or gate.shape[0] == 0:
            raise InternalError(f"{where}: MLP widths disagree: gate {gate.shape[0]}, up {up.shape[0]}, down columns {down.shape[1]}")
        for name, lin in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                          ("o_proj", attn.o_proj), ("gate_proj", mlp.gate_proj), ("up_proj", mlp.up_proj),
                          ("down_proj", mlp.down_proj)):
            if lin.bias is not None and lin.bias.shape[0] != lin.weight.shape[0]:
                raise InternalError(f"{where}: {name} bias length {lin.bias.shape[0]} != rows {lin.weight.shape[0]}")
            if lin.in_features != lin.weight.shape[1] or lin.out_features != lin.weight.shape[0]:
                raise InternalError(f"{where}: {name} in/out_features do not match its weight {tuple(lin.weight.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Choosing what to keep


def _scores_1d(scores: Any, field: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"{field}: not a numeric vector ({err})") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidInputError(f"{field}: expected a non-empty 1-D vector, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{field}: contains NaN or infinite scores")
    return arr


def _top_k_sorted(scores: np.ndarray, k: int) -> tuple[int, ...]:
    """Indices of the k largest scores (ties: lower index wins), returned in increasing index order."""
    order = np.argsort(-scores, kind="stable")  # stable sort keeps lower indices first among equal scores
    return tuple(sorted(int(i) for i in order[:k]))


def select_keep(
    kv_group_scores: Sequence[Any],
    channel_scores: Sequence[Any],
    kv_groups_kept: Sequence[int],
    mlp_kept: Sequence[int],
) -> list[LayerKeep]:
    """Per layer, keep the kv_groups_kept[l] highest-scoring KV groups and the mlp_kept[l] highest-scoring channels.

    Ties are broken by the lower index, so the result is deterministic. Counts must be in 1..n.
    """
    n_layers = len(kv_group_scores)
    for name, seq in (("channel_scores", channel_scores), ("kv_groups_kept", kv_groups_kept), ("mlp_kept", mlp_kept)):
        if len(seq) != n_layers:
            raise InvalidInputError(f"{name}: has {len(seq)} layers, kv_group_scores has {n_layers}")
    keep = []
    for layer in range(n_layers):
        kv = _scores_1d(kv_group_scores[layer], f"kv_group_scores[{layer}]")
        ch = _scores_1d(channel_scores[layer], f"channel_scores[{layer}]")
        n_kv, n_ch = _count(kv_groups_kept[layer], f"kv_groups_kept[{layer}]"), _count(mlp_kept[layer], f"mlp_kept[{layer}]")
        if not 1 <= n_kv <= kv.size:
            raise InvalidInputError(f"kv_groups_kept[{layer}]={n_kv}: must be in 1..{kv.size} (a layer keeps at least one KV group)")
        if not 1 <= n_ch <= ch.size:
            raise InvalidInputError(f"mlp_kept[{layer}]={n_ch}: must be in 1..{ch.size}")
        keep.append(LayerKeep(kv_heads=_top_k_sorted(kv, n_kv), mlp_channels=_top_k_sorted(ch, n_ch)))
    return keep


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value.item())
        raise InvalidInputError(f"{field}: expected an integer count, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------
# Index sets


def _validate_keep(keep: Sequence[LayerKeep], shapes: list[dict[str, int]]) -> None:
    if len(keep) != len(shapes):
        raise InvalidInputError(f"keep: has {len(keep)} entries, the model has {len(shapes)} decoder layers")
    for i, (entry, shape) in enumerate(zip(keep, shapes)):
        if not isinstance(entry, LayerKeep):
            raise InvalidInputError(f"keep[{i}]: expected a LayerKeep, got {type(entry).__name__}")
        for field, idxs, size in (("kv_heads", entry.kv_heads, shape["num_kv_heads"]),
                                  ("mlp_channels", entry.mlp_channels, shape["intermediate"])):
            if len(idxs) == 0:
                what = "KV group" if field == "kv_heads" else "MLP channel"
                raise InvalidInputError(f"keep[{i}].{field}: empty; every layer must keep at least one {what}")
            if any(isinstance(j, bool) or not isinstance(j, (int, np.integer)) for j in idxs):
                raise InvalidInputError(f"keep[{i}].{field}: indices must be integers")
            if list(idxs) != sorted(set(int(j) for j in idxs)):
                raise InvalidInputError(f"keep[{i}].{field}: indices must be sorted and unique")
            if idxs[0] < 0 or idxs[-1] >= size:
                raise InvalidInputError(f"keep[{i}].{field}: indices must be in 0..{size - 1}")


def _removed(kept: Sequence[int], size: int) -> list[int]:
    kept_set = set(int(j) for j in kept)
    return [j for j in range(size) if j not in kept_set]


def _kv_rows(kv_heads: Sequence[int], head_dim: int) -> list[int]:
    """k_proj / v_proj rows of the given KV heads."""
    return [j * head_dim + d for j in kv_heads for d in range(head_dim)]


def _q_rows(kv_heads: Sequence[int], ratio: int, head_dim: int) -> list[int]:
    """q_proj rows (= o_proj columns) of the query heads r*j .. r*j+r-1 served by the given KV heads."""
    return [(ratio * j + t) * head_dim + d for j in kv_heads for t in range(ratio) for d in range(head_dim)]


# ----------------------------------------------------------------------------------------------------------------
# Reference: the dense model with removed structures masked


def masked_dense_forward(model: nn.Module, input_ids: torch.Tensor, keep: Sequence[LayerKeep]) -> torch.Tensor:
    """Logits of the DENSE model with the removed query heads and MLP channels zeroed.

    Forward pre-hooks multiply the o_proj input by a 0/1 mask over query-head columns (heads r*j..r*j+r-1 of
    every removed KV group j) and the down_proj input by a 0/1 mask over MLP channels. Removing those structures
    is exactly this masking, so a correctly pruned model's logits must equal these. The model is not modified.
    """
    shapes = layer_shapes(model)
    _validate_keep(keep, shapes)
    layers = _decoder_layers(model)
    handles = []

    def make_hook(mask: torch.Tensor):
        def hook(_module: nn.Module, args: tuple[Any, ...]):
            x = args[0]
            return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        return hook

    try:
        for layer, entry, shape in zip(layers, keep, shapes):
            ratio = shape["num_q_heads"] // shape["num_kv_heads"]
            head_mask = torch.zeros(shape["num_q_heads"] * shape["head_dim"])
            head_mask[_q_rows(entry.kv_heads, ratio, shape["head_dim"])] = 1.0
            channel_mask = torch.zeros(shape["intermediate"])
            channel_mask[list(entry.mlp_channels)] = 1.0
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(make_hook(head_mask)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(make_hook(channel_mask)))
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# Pruning


def _logits_of(output: Any) -> torch.Tensor:
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output


class LlamaStructuredPruner:
    """Prunes KV groups and MLP channels of one Llama model in place, through Torch-Pruning.

    The Torch-Pruning DependencyGraph is traced once here (use_cache disabled, logits as the output). Layers
    with parameters besides q/k/v/o_proj and gate/up/down_proj (for example per-head q/k norms), or whose
    gate_proj group couples other layers, are refused instead of pruned wrongly.
    """

    def __init__(self, model: nn.Module, example_input_ids: torch.Tensor | None = None) -> None:
        import torch_pruning as tp

        self.model = model
        self._layers = _decoder_layers(model)
        check_consistency(model)
        if example_input_ids is None:
            vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
            device = next(model.parameters()).device
            example_input_ids = (torch.arange(8, device=device) % vocab).unsqueeze(0)
        if not isinstance(example_input_ids, torch.Tensor) or example_input_ids.dim() != 2:
            raise InvalidInputError("example_input_ids: expected a 2-D LongTensor (batch, sequence)")

        config = getattr(model, "config", None)
        saved_use_cache = getattr(config, "use_cache", None)
        saved_training = model.training
        saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        try:
            if config is not None and saved_use_cache is not None:
                config.use_cache = False
            for p, _ in saved_requires_grad:
                p.requires_grad_(True)  # tracing follows autograd's graph
            with torch.enable_grad():
                self.graph = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=example_input_ids,
                    forward_fn=lambda m, ids: m(input_ids=ids, use_cache=False),
                    output_transform=_logits_of,
                    verbose=False,
                )
        finally:
            if config is not None and saved_use_cache is not None:
                config.use_cache = saved_use_cache
            for p, flag in saved_requires_grad:
                p.requires_grad_(flag)
            model.train(saved_training)
        self._check_coupling()

    def _coupled_linears(self, root: nn.Linear, idxs: list[int]) -> set[tuple[int, bool]]:
        """(id(module), is_out_channels) of the real nn.Linear layers in root's out-channel group."""
        import torch_pruning as tp

        group = self.graph.get_pruning_group(root, tp.prune_linear_out_channels, idxs=idxs)
        touched = set()
        for dep, _ in group:
            module = dep.target.module
            if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
                touched.add((id(module), self.graph.is_out_channel_pruning_fn(dep.handler)))
        return touched

    def _check_coupling(self) -> None:
        """Refuse layers with parameters this class would not prune consistently (e.g. per-head q/k norms).

        The attention check is structural: Torch-Pruning 1.6's group rooted at k_proj maps KV rows one-to-one
        onto q rows (wrong under GQA) and its traversal did not finish for a 2:1 GQA model, so it is not used.
        The MLP group rooted at gate_proj must couple exactly gate/up rows and down_proj columns.
        """
        for i, layer in enumerate(self._layers):
            attn, mlp = layer.self_attn, layer.mlp
            for block, expected in ((attn, {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                    (mlp, {"gate_proj", "up_proj", "down_proj"})):
                owners = {name.split(".")[0] for name, _ in block.named_parameters()}
                if not owners <= expected:
                    extra = sorted(owners - expected)
                    raise ModelError(f"model.layers[{i}]: unsupported parameters {extra} next to {sorted(expected)}")
            mlp_expected = {(id(mlp.gate_proj), True), (id(mlp.up_proj), True), (id(mlp.down_proj), False)}
            if self._coupled_linears(mlp.gate_proj, [0]) != mlp_expected:
                raise ModelError(
                    f"model.layers[{i}].mlp: Torch-Pruning couples gate_proj with layers other than gate/up/down_proj; "
                    "this architecture is not supported"
                )

    def prune(self, keep: Sequence[LayerKeep]) -> None:
        """Remove, in place, every KV group and MLP channel not listed in keep (indices refer to current shapes)."""
        import torch_pruning as tp

        shapes = layer_shapes(self.model)
        _validate_keep(keep, shapes)
        requires_grad = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for i, (layer, entry, shape) in enumerate(zip(self._layers, keep, shapes)):
            attn, mlp = layer.self_attn, layer.mlp
            head_dim = shape["head_dim"]
            ratio = shape["num_q_heads"] // shape["num_kv_heads"]
            removed_kv = _removed(entry.kv_heads, shape["num_kv_heads"])
            if removed_kv:
                kv_rows = _kv_rows(removed_kv, head_dim)
                q_rows = _q_rows(removed_kv, ratio, head_dim)
                tp.prune_linear_out_channels(attn.k_proj, kv_rows)
                tp.prune_linear_out_channels(attn.v_proj, kv_rows)
                tp.prune_linear_out_channels(attn.q_proj, q_rows)
                tp.prune_linear_in_channels(attn.o_proj, q_rows)
                kept_kv = shape["num_kv_heads"] - len(removed_kv)
                # transformers < 5 reshapes with these per-module attributes; 5.x uses -1 and head_dim only.
                if hasattr(attn, "num_heads"):
                    attn.num_heads = kept_kv * ratio
                if hasattr(attn, "num_key_value_heads"):
                    attn.num_key_value_heads = kept_kv
            removed_channels = _removed(entry.mlp_channels, shape["intermediate"])
            if removed_channels:
                group = self.graph.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=removed_channels)
                if not self.graph.check_pruning_group(group):
                    raise InternalError(f"model.layers[{i}].mlp: Torch-Pruning refused the pruning group")
                group.prune()
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = len(entry.mlp_channels)
        for name, p in self.model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
        self._verify(keep, shapes)
        self._record_shapes()

    def _verify(self, keep: Sequence[LayerKeep], before: list[dict[str, int]]) -> None:
        check_consistency(self.model)
        after = layer_shapes(self.model)
        for i, (entry, old, new) in enumerate(zip(keep, before, after)):
            ratio = old["num_q_heads"] // old["num_kv_heads"]
            expected = {"num_q_heads": len(entry.kv_heads) * ratio, "num_kv_heads": len(entry.kv_heads),
                        "head_dim": old["head_dim"], "intermediate": len(entry.mlp_channels)}
            if new != expected:
                raise InternalError(f"model.layers[{i}]: shapes after pruning {new} != expected {expected}")

    def _record_shapes(self) -> None:
        """Store per-layer widths on the config (extra keys; the global widths stay as they were)."""
        config = getattr(self.model, "config", None)
        if config is None:
            return
        shapes = layer_shapes(self.model)
        config.layer_num_attention_heads = [s["num_q_heads"] for s in shapes]
        config.layer_num_key_value_heads = [s["num_kv_heads"] for s in shapes]
        config.layer_intermediate_sizes = [s["intermediate"] for s in shapes]


def prune_llama(model: nn.Module, keep: Sequence[LayerKeep], example_input_ids: torch.Tensor | None = None) -> nn.Module:
    """Return a pruned deep copy of model; the input model is left unchanged."""
    pruned = copy.deepcopy(model)
    LlamaStructuredPruner(pruned, example_input_ids).prune(keep)
    return pruned

