"""Structured pruning mechanics: remove whole KV groups and MLP channels from any supported family.

What is removed, per decoder layer (GQA ratio r = num_heads // num_kv_heads, head size hd):

* KV group j: k_proj / v_proj rows j*hd .. (j+1)*hd-1, the rows of its r query heads r*j .. r*j+r-1 in q_proj,
  and the matching o_proj input columns. r stays the same, so every kept query head still reads its own KV head.
* MLP channel c: gate_proj row c, up_proj row c, down_proj column c.

The residual width (hidden size), the RMSNorm weights and per-head q/k norms (Qwen3) are never touched, so
layers are independent. Biases go with their rows (Qwen2's q/k/v biases); an o_proj bias is never sliced. q/k norms
over the whole projections (OLMo-2) lose their removed heads' weights, and then normalise over the kept heads.
A layer may keep no KV group or no channel: the block becomes empty (``EmptyAttention`` / ``EmptyMLP`` of
:mod:`layerprune.arch.modeling_layerprune`, put in place by the adapter's ``set_widths``).

The tensor surgery is done by Torch-Pruning (Fang et al., "DepGraph", CVPR 2023). The MLP uses the dependency
group rooted at gate_proj (out channels), which couples gate/up rows with down_proj columns. For attention the
group rooted at k_proj maps KV rows one-to-one onto q_proj rows, which is wrong under GQA, so the index sets are
computed here and applied with `tp.prune_linear_out_channels` / `tp.prune_linear_in_channels`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from layerprune.arch import LayerGeometry, adapter_for, check_consistency, gqa, layer_shapes
from layerprune.errors import InternalError, InvalidInputError, ModelError
from layerprune.scoring.selection import LayerKeep

__all__ = ["KeptHeadsNorm", "StructuredPruner", "hold_kept_heads_norms", "masked_dense_forward", "prune_decoder_layer",
           "pruned_copy"]


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
            if len(idxs) == 0:  # an empty block: the layer's attention or MLP goes whole
                continue
            if any(isinstance(j, bool) or not isinstance(j, (int, np.integer)) for j in idxs):
                raise InvalidInputError(f"keep[{i}].{field}: indices must be integers")
            if list(idxs) != sorted(set(int(j) for j in idxs)):
                raise InvalidInputError(f"keep[{i}].{field}: indices must be sorted and unique")
            if idxs[0] < 0 or idxs[-1] >= size:
                raise InvalidInputError(f"keep[{i}].{field}: indices must be in 0..{size - 1}")


def _ratio(shape: dict[str, int]) -> int:
    """:attr:`LayerGeometry.ratio` of a :func:`layer_shapes` entry (0 for an empty attention)."""
    return LayerGeometry(**shape).ratio


def _removed(kept: Sequence[int], size: int) -> list[int]:
    kept_set = set(int(j) for j in kept)
    return [j for j in range(size) if j not in kept_set]


class KeptHeadsNorm(nn.Module):
    """A q/k norm over the whole projection (OLMo-2) as it will be once the removed heads are cut, at the dense width:
    ``y[kept] = w[kept] · x[kept] / √(mean(x[kept]²) + ε)``, ``y`` zero elsewhere. The refit puts it in place so that
    the layer it refits computes the pruned layer; the surgery takes the dense norm back out and slices it."""

    def __init__(self, norm: nn.Module, kept_rows: Sequence[int]) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("kept", torch.as_tensor(list(kept_rows), dtype=torch.long), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.kept.to(x.device)
        inside = x.index_select(-1, kept).float()
        inside = inside * torch.rsqrt(inside.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon)
        out = torch.zeros_like(x)
        out[..., kept] = (self.norm.weight.index_select(0, kept) * inside.to(x.dtype)).to(x.dtype)
        return out


def hold_kept_heads_norms(adapter: Any, attn: nn.Module, kv_heads: Sequence[int], ratio: int, head_dim: int) -> bool:
    """Put :class:`KeptHeadsNorm` in place of each norm over a whole projection (OLMo-2's q_norm, k_norm) for the kept
    KV groups ``kv_heads``; False (nothing done) for a family without such norms."""
    rows = {"q_proj": gqa.q_rows(kv_heads, ratio, head_dim), "k_proj": gqa.kv_rows(kv_heads, head_dim)}
    for norm_name, projection in adapter.sliced_attention_norms().items():
        norm = getattr(attn, norm_name)
        dense = norm.norm if isinstance(norm, KeptHeadsNorm) else norm
        whole = len(rows[projection]) == dense.weight.shape[0]  # every head kept: the norm as it is
        setattr(attn, norm_name, dense if whole else KeptHeadsNorm(dense, rows[projection]))
    return bool(adapter.sliced_attention_norms())


def _slice_attention_norms(adapter: Any, attn: nn.Module, q_rows: list[int], kv_rows: list[int]) -> None:
    """Remove the removed heads' weights from the norms over the whole q and k projections (OLMo-2), in place (a
    :class:`KeptHeadsNorm` the refit left is replaced by its dense norm, sliced to the same rows)."""
    rows = {"q_proj": q_rows, "k_proj": kv_rows}
    for norm_name, projection in adapter.sliced_attention_norms().items():
        norm = getattr(attn, norm_name)
        drop = set(rows[projection])
        kept = [i for i in range(norm.weight.shape[0]) if i not in drop]
        if isinstance(norm, KeptHeadsNorm):
            if norm.kept.tolist() != kept:
                raise InternalError(f"self_attn.{norm_name}: refit for rows {norm.kept.tolist()}, cut to {kept}")
            norm = norm.norm
            setattr(attn, norm_name, norm)
        norm.weight = nn.Parameter(norm.weight.detach()[kept].clone(), requires_grad=norm.weight.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# Reference: the dense model with removed structures masked


def masked_dense_forward(model: nn.Module, input_ids: torch.Tensor, keep: Sequence[LayerKeep]) -> torch.Tensor:
    """Logits of the DENSE model with the removed query heads and MLP channels zeroed.

    Forward pre-hooks multiply the o_proj input by a 0/1 mask over query-head columns (heads r*j..r*j+r-1 of
    every removed KV group j) and the down_proj input by a 0/1 mask over MLP channels. Removing those structures
    is exactly this masking, so a correctly pruned model's logits must equal these. A q/k norm over the whole
    projection (OLMo-2) is recomputed, in float32, as an RMSNorm over the kept heads' rows (what the pruned norm
    computes). The model is not modified.
    """
    shapes = layer_shapes(model)
    _validate_keep(keep, shapes)
    layers = adapter_for(model).decoder_layers(model)
    handles = []

    def make_hook(mask: torch.Tensor):
        def hook(_module: nn.Module, args: tuple[Any, ...]):
            x = args[0]
            return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        return hook

    def kept_rms_hook(kept: list[int]):
        def hook(norm: nn.Module, args: tuple[Any, ...], _out: torch.Tensor) -> torch.Tensor:
            x = args[0].float()
            inside = x[..., kept]
            out = torch.zeros_like(x)
            out[..., kept] = inside * torch.rsqrt(inside.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return (norm.weight.float() * out).to(args[0].dtype)

        return hook

    adapter = adapter_for(model)
    try:
        for layer, entry, shape in zip(layers, keep, shapes):
            ratio = _ratio(shape)
            head_mask = torch.zeros(shape["num_q_heads"] * shape["head_dim"])
            q_kept = gqa.q_rows(entry.kv_heads, ratio, shape["head_dim"])
            head_mask[q_kept] = 1.0
            channel_mask = torch.zeros(shape["intermediate"])
            channel_mask[list(entry.mlp_channels)] = 1.0
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(make_hook(head_mask)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(make_hook(channel_mask)))
            kept_rows = {"q_proj": list(q_kept), "k_proj": list(gqa.kv_rows(entry.kv_heads, shape["head_dim"]))}
            for norm_name, projection in adapter.sliced_attention_norms().items():  # RMS over the kept heads only
                norm = getattr(layer.self_attn, norm_name)
                handles.append(norm.register_forward_hook(kept_rms_hook(kept_rows[projection])))
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


class StructuredPruner:
    """Prunes KV groups and MLP channels of one model in place, through Torch-Pruning.

    The Torch-Pruning DependencyGraph is traced once here (use_cache disabled, logits as the output). Layers
    with parameters besides q/k/v/o_proj, gate/up/down_proj and the adapter's unsliced per-head norms, or whose
    gate_proj group couples other layers, are refused instead of pruned wrongly.
    """

    def __init__(self, model: nn.Module, example_input_ids: torch.Tensor | None = None) -> None:
        import torch_pruning as tp

        self.model = model
        self.adapter = adapter_for(model)
        self._layers = self.adapter.decoder_layers(model)
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
        """Refuse layers with parameters this class would not prune consistently.

        The attention check is structural: Torch-Pruning 1.6's group rooted at k_proj maps KV rows one-to-one
        onto q rows (wrong under GQA) and its traversal did not finish for a 2:1 GQA model, so it is not used.
        The MLP group rooted at gate_proj must couple exactly gate/up rows and down_proj columns.
        """
        for i, layer in enumerate(self._layers):
            attn, mlp = layer.self_attn, layer.mlp
            attn_expected = {"q_proj", "k_proj", "v_proj", "o_proj", *self.adapter.unpruned_attention_parameters(),
                             *self.adapter.sliced_attention_norms()}
            for block, expected in ((attn, attn_expected),
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
            ratio = _ratio(shape)
            removed_kv = _removed(entry.kv_heads, shape["num_kv_heads"])
            if removed_kv:
                kv_rows = gqa.kv_rows(removed_kv, head_dim)
                q_rows = gqa.q_rows(removed_kv, ratio, head_dim)
                tp.prune_linear_out_channels(attn.k_proj, kv_rows)
                tp.prune_linear_out_channels(attn.v_proj, kv_rows)
                tp.prune_linear_out_channels(attn.q_proj, q_rows)
                tp.prune_linear_in_channels(attn.o_proj, q_rows)
            _slice_attention_norms(self.adapter, attn, q_rows if removed_kv else [], kv_rows if removed_kv else [])
            removed_channels = _removed(entry.mlp_channels, shape["intermediate"])
            if removed_channels:  # the group _check_coupling found: gate/up rows, down_proj columns (the index map
                # through a fused gate_up_proj's concatenation and chunk is not Torch-Pruning's to follow)
                tp.prune_linear_out_channels(mlp.gate_proj, removed_channels)
                tp.prune_linear_out_channels(mlp.up_proj, removed_channels)
                tp.prune_linear_in_channels(mlp.down_proj, removed_channels)
            self.adapter.set_widths(layer, LayerGeometry(len(entry.kv_heads) * ratio, len(entry.kv_heads), head_dim,
                                                         len(entry.mlp_channels)))
        for name, p in self.model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
        self._verify(keep, shapes)
        self._record_shapes()

    def _verify(self, keep: Sequence[LayerKeep], before: list[dict[str, int]]) -> None:
        check_consistency(self.model)
        after = layer_shapes(self.model)
        for i, (entry, old, new) in enumerate(zip(keep, before, after)):
            ratio = _ratio(old)
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


def prune_decoder_layer(adapter: Any, layer: nn.Module, geometry: LayerGeometry, entry: LayerKeep) -> LayerGeometry:
    """Remove, in place, the KV groups and MLP channels of ONE decoder layer not listed in ``entry`` (indices
    into its current ``geometry``); returns the new geometry. The index sets are :class:`StructuredPruner`'s:
    the GQA rows of the removed KV groups (the module docstring), and for the MLP the gate/up rows and down_proj
    columns of the removed channels, the group Torch-Pruning traces for gate_proj, applied here without a
    model-wide graph (the layer-by-layer engine holds one layer). Parameters keep ``requires_grad=False``."""
    import torch_pruning as tp

    shape = {"num_q_heads": geometry.num_q_heads, "num_kv_heads": geometry.num_kv_heads,
             "head_dim": geometry.head_dim, "intermediate": geometry.intermediate}
    _validate_keep([entry], [shape])
    attn, mlp = layer.self_attn, layer.mlp
    ratio, head_dim = geometry.ratio, geometry.head_dim
    removed_kv = _removed(entry.kv_heads, geometry.num_kv_heads)
    if removed_kv:
        kv_rows = gqa.kv_rows(removed_kv, head_dim)
        q_rows = gqa.q_rows(removed_kv, ratio, head_dim)
        tp.prune_linear_out_channels(attn.k_proj, kv_rows)
        tp.prune_linear_out_channels(attn.v_proj, kv_rows)
        tp.prune_linear_out_channels(attn.q_proj, q_rows)
        tp.prune_linear_in_channels(attn.o_proj, q_rows)
    _slice_attention_norms(adapter, attn, q_rows if removed_kv else [], kv_rows if removed_kv else [])
    removed_channels = _removed(entry.mlp_channels, geometry.intermediate)
    if removed_channels:
        tp.prune_linear_out_channels(mlp.gate_proj, removed_channels)
        tp.prune_linear_out_channels(mlp.up_proj, removed_channels)
        tp.prune_linear_in_channels(mlp.down_proj, removed_channels)
    for p in layer.parameters():
        p.requires_grad_(False)
    new = LayerGeometry(len(entry.kv_heads) * ratio, len(entry.kv_heads), head_dim, len(entry.mlp_channels))
    adapter.set_widths(layer, new)
    got = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features, attn.o_proj.in_features,
           mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features)
    want = (new.num_q_heads * head_dim, new.num_kv_heads * head_dim, new.num_kv_heads * head_dim,
            new.num_q_heads * head_dim, new.intermediate, new.intermediate, new.intermediate)
    if got != want:
        raise InternalError(f"pruned layer: q/k/v/o and gate/up/down widths {got}, expected {want}")
    return new


def pruned_copy(model: nn.Module, keep: Sequence[LayerKeep], example_input_ids: torch.Tensor | None = None) -> nn.Module:
    """A deep copy of ``model`` with only the KV groups and MLP channels ``keep`` names (the surgery of a plan made
    elsewhere); the input model is left unchanged."""
    pruned = copy.deepcopy(model)
    StructuredPruner(pruned, example_input_ids).prune(keep)
    return pruned

