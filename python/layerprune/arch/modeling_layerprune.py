"""Causal LMs whose decoder layers have their own widths (query heads, KV heads, MLP width), as left by layerprune.

This file is copied next to the weights of every model layerprune saves, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works without layerprune installed.
It imports only torch and transformers, and names no model family: `Layerprune<P>Config` and
`Layerprune<P>ForCausalLM` are made on first access from transformers' `<P>ForCausalLM` and its config class
(for example P = Qwen2: Qwen2Config; P = Gemma3: Gemma3TextConfig), with the base model_type.

config.json keeps the dense model's global widths and adds, per layer l:
  layer_num_attention_heads[l], layer_num_key_value_heads[l], layer_intermediate_sizes[l]
and, when the kept weights were refit with bias compensation, layerprune_output_bias: true (o_proj and
down_proj then carry a bias).
Each layer is built dense by the family's transformers code, then its q/k/v/o and gate/up/down projections
are replaced by Linear layers of that layer's widths (biases where the dense layer had them). head_dim, the
hidden size and every other module (norms, per-head q/k norms, rotary embedding, sliding window) are those
of the dense model, except q/k norms over the whole projections (OLMo-2), which get that layer's width; a layer's
GQA ratio is its query heads // its KV heads.

A layer may keep no head or no MLP channel (an empty block: 0 in those lists). Its projections are then zero-width
Linear layers (the state dict has the same names, with empty tensors), and the block is :class:`EmptyAttention` or
:class:`EmptyMLP`, which add nothing to the residual stream (an output bias, if any); llama.cpp's ``deci`` runs the same
layer with ``head_count`` or ``feed_forward_length`` 0 there.

A family that fuses projections (Phi-3: qkv_proj = [q | k | v] rows, gate_up_proj = [gate | up] rows) keeps its
own attention and MLP code: each fused Linear is split into the separate ones (saved under their names), and
the family's code, which calls the fused projection, gets their outputs concatenated (ConcatenatedProjections);
an attention whose code reads its head counts from the config sees this layer's (LayerHeadsConfig).
"""

from __future__ import annotations

from typing import Any

import warnings

import torch
import transformers
from torch import nn

LAYER_WIDTH_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes")
# Config key of a pruned model whose o_proj and down_proj carry a bias (FLAP-style bias compensation).
OUTPUT_BIAS_KEY = "layerprune_output_bias"
_PREFIX = "Layerprune"
_MADE: dict[str, type] = {}


# A fused projection's name -> the separate projections it stacks, in row order.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class ConcatenatedProjections:
    """Stands where a family's code calls a fused projection: ``cat([P₁(x), P₂(x), ...], -1)`` of its owner's
    separate Linear layers (``names``), so their rows can be removed one projection at a time."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...]) -> None:
        self.owner, self.names = owner, tuple(names)

    def __call__(self, hidden: Any) -> Any:
        return torch.cat([getattr(self.owner, n)(hidden) for n in self.names], dim=-1)


class LayerHeadsConfig:
    """The model's config as one attention module sees it after its q/k/v were split: ``num_attention_heads``
    and ``num_key_value_heads`` are this module's (from its weights, so they follow pruning), every other field
    is read from the model's config (an attention implementation set later is seen)."""

    def __init__(self, config: Any, attention: nn.Module) -> None:
        self.__dict__.update(_config=config, _attention=attention)

    def _heads(self, projection: str) -> int:
        attention = self.__dict__["_attention"]
        return getattr(attention, projection).out_features // attention.head_dim

    @property
    def num_attention_heads(self) -> int:
        return self._heads("q_proj")

    @property
    def num_key_value_heads(self) -> int:
        return self._heads("k_proj")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_config" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["_config"], name)


def _zero_width_input(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.new_zeros(*hidden.shape[:-1], 0)


class EmptyAttention(nn.Module):
    """An attention block with no head left: ``o_proj(x[..., :0])`` (zeros, or o_proj's bias). It holds the family's
    submodules (the zero-width projections, per-head norms) under their names. Called with a KV cache, it stores one
    zero of width 1 per position in its layer's slot: a cache reads its length from its first layer's keys, and a
    zero-head tensor is read as empty."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        for name, module in attention.named_children():
            self.add_module(name, module)
        self.layer_idx = getattr(attention, "layer_idx", None)
        self.head_dim = attention.head_dim
        self.num_key_value_groups = 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = self.o_proj(_zero_width_input(hidden_states))
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                     None)
        if cache is not None and self.layer_idx is not None and hidden_states.dim() == 3:
            mark = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(mark, mark, self.layer_idx)
        return out, None


class EmptyMLP(nn.Module):
    """An MLP with no channel left: ``down_proj(x[..., :0])`` (zeros, or down_proj's bias); it holds the zero-width
    gate/up/down projections under their names."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        for name, module in mlp.named_children():
            self.add_module(name, module)
        self.intermediate_size = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_zero_width_input(hidden_states))


def install_empty_blocks(layer: Any) -> None:
    """Put :class:`EmptyAttention` in place of a decoder layer's attention whose k_proj has no row, and
    :class:`EmptyMLP` in place of an MLP whose gate_proj has none (in place; nothing to do otherwise)."""
    if not isinstance(layer.self_attn, EmptyAttention) and layer.self_attn.k_proj.out_features == 0:
        layer.self_attn = EmptyAttention(layer.self_attn)
    if not isinstance(layer.mlp, EmptyMLP) and layer.mlp.gate_proj.out_features == 0:
        layer.mlp = EmptyMLP(layer.mlp)


def _config_field(config: Any, key: str) -> Any:
    """``key`` of a config object or of config.json read as a dict; None when absent."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def fused_rows(fused: str, config: Any, rows: int) -> tuple[int, ...]:
    """Rows of each separate projection inside the dense model's fused projection ``fused`` of ``rows`` rows:
    q, k, v rows from the config's heads and head_dim; gate and up halves."""
    if fused == "gate_up_proj":
        return (rows // 2, rows - rows // 2)
    heads = _config_field(config, "num_attention_heads")
    head_dim = _config_field(config, "head_dim") or _config_field(config, "hidden_size") // heads
    kv_heads = _config_field(config, "num_key_value_heads") or heads
    return (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)


def split_fused_projections(layer: Any, config: Any) -> None:
    """Split each fused projection of a decoder layer's attention and MLP (:data:`FUSED_PROJECTIONS`) into its
    separate Linear layers, in place, with the fused weight's rows (and bias); nothing to do when none is fused."""
    for block in (layer.self_attn, layer.mlp):
        for fused, names in FUSED_PROJECTIONS.items():
            linear = block._modules.get(fused)
            if not isinstance(linear, nn.Linear):
                continue
            sizes = fused_rows(fused, config, linear.out_features)
            if sum(sizes) != linear.out_features:
                raise ValueError(f"{fused}: {linear.out_features} rows, the config gives {sum(sizes)}")
            del block._modules[fused]
            start = 0
            for name, size in zip(names, sizes):
                part = nn.Linear(linear.in_features, size, bias=linear.bias is not None, device="meta",
                                 dtype=linear.weight.dtype)
                part.weight = nn.Parameter(linear.weight.detach()[start:start + size].clone(),
                                           requires_grad=linear.weight.requires_grad)
                if linear.bias is not None:
                    part.bias = nn.Parameter(linear.bias.detach()[start:start + size].clone(),
                                             requires_grad=linear.bias.requires_grad)
                setattr(block, name, part)
                start += size
            setattr(block, fused, ConcatenatedProjections(block, names))
            if fused == "qkv_proj" and hasattr(block, "config"):
                block.config = LayerHeadsConfig(block.config, block)


def layer_widths(config: Any) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, MLP width) per layer; layers without a listed width keep the global one."""
    n_layers = config.num_hidden_layers
    defaults = (config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                config.intermediate_size)
    columns = []
    for key, default in zip(LAYER_WIDTH_KEYS, defaults):
        values = getattr(config, key, None)
        values = [default] * n_layers if values is None else list(values)
        if len(values) != n_layers:
            raise ValueError(f"config.{key}: has {len(values)} entries, num_hidden_layers is {n_layers}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ValueError(f"config.{key}: every entry must be an integer >= 0")
        columns.append(values)
    widths = list(zip(*columns))
    for i, (q_heads, kv_heads, _) in enumerate(widths):
        if (q_heads == 0) != (kv_heads == 0):
            raise ValueError(f"layer {i}: {q_heads} query heads and {kv_heads} KV heads (an empty attention has neither)")
        if kv_heads and q_heads % kv_heads:
            raise ValueError(f"layer {i}: {q_heads} query heads is not a multiple of {kv_heads} KV heads")
    return widths


def _linear_like(old: nn.Linear, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """``old`` if it has these sizes (and a bias when asked for one), else a new Linear like it."""
    bias = bias or old.bias is not None
    if old.in_features == in_features and old.out_features == out_features and (old.bias is not None) == bias:
        return old
    with warnings.catch_warnings():  # a zero-width Linear (an empty block): torch says its initialisation does nothing
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_decoder_layers(model: Any, config: Any) -> None:
    """Give each decoder layer of a freshly built (dense) model its own widths; weights are re-created, not kept."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    output_bias = bool(getattr(config, OUTPUT_BIAS_KEY, False))  # bias compensation on o_proj and down_proj
    for layer, (q_heads, kv_heads, intermediate) in zip(model.layers, layer_widths(config)):
        split_fused_projections(layer, config)
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _linear_like(attn.q_proj, hidden, q_heads * head_dim)
        attn.k_proj = _linear_like(attn.k_proj, hidden, kv_heads * head_dim)
        attn.v_proj = _linear_like(attn.v_proj, hidden, kv_heads * head_dim)
        attn.o_proj = _linear_like(attn.o_proj, q_heads * head_dim, hidden, bias=output_bias)
        dense_kv = config.num_key_value_heads or config.num_attention_heads
        for norm_name, dense_heads, heads in (("q_norm", config.num_attention_heads, q_heads), ("k_norm", dense_kv, kv_heads)):
            weight = getattr(getattr(attn, norm_name, None), "weight", None)  # a norm over the whole projection (OLMo-2)
            if weight is not None and dense_heads > 1 and weight.shape == (dense_heads * head_dim,) and heads != dense_heads:
                getattr(attn, norm_name).weight = nn.Parameter(torch.ones(heads * head_dim, dtype=weight.dtype,
                                                                          device=weight.device))
        attn.num_key_value_groups = q_heads // kv_heads if kv_heads else 0
        # Older transformers reshape with these per-module attributes; newer ones infer heads from the weights.
        if hasattr(attn, "num_heads"):
            attn.num_heads = q_heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv_heads
        mlp.gate_proj = _linear_like(mlp.gate_proj, hidden, intermediate)
        mlp.up_proj = _linear_like(mlp.up_proj, hidden, intermediate)
        mlp.down_proj = _linear_like(mlp.down_proj, intermediate, hidden, bias=output_bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate
        install_empty_blocks(layer)


def _make(family_prefix: str) -> tuple[type, type]:
    base_model = getattr(transformers, f"{family_prefix}ForCausalLM")
    base_config = base_model.config_class  # Gemma3ForCausalLM's is Gemma3TextConfig, not Gemma3Config
    config_class = type(f"{_PREFIX}{family_prefix}Config", (base_config,), {
        "model_type": base_config.model_type,
        "__module__": __name__,
        "__doc__": f"{base_config.__name__} plus per-layer widths (the lists named in LAYER_WIDTH_KEYS).",
    })

    def __init__(self: Any, config: Any) -> None:
        base_model.__init__(self, config)
        resize_decoder_layers(self.model, config)
        self.post_init()

    model_class = type(f"{_PREFIX}{family_prefix}ForCausalLM", (base_model,), {
        "config_class": config_class,
        "__init__": __init__,
        "__module__": __name__,
        "__doc__": f"{family_prefix}ForCausalLM with per-layer widths read from its config.",
    })
    _MADE[config_class.__name__] = config_class
    _MADE[model_class.__name__] = model_class
    return config_class, model_class


def pruned_classes(family_prefix: str) -> tuple[type, type]:
    """(config class, causal-LM class) of a pruned model of the transformers family ``family_prefix``."""
    config_name = f"{_PREFIX}{family_prefix}Config"
    if config_name not in _MADE:
        _make(family_prefix)
    return _MADE[config_name], _MADE[f"{_PREFIX}{family_prefix}ForCausalLM"]


def __getattr__(name: str) -> Any:
    for suffix in ("ForCausalLM", "Config"):
        if name.startswith(_PREFIX) and name.endswith(suffix) and len(name) > len(_PREFIX) + len(suffix):
            family_prefix = name[len(_PREFIX):-len(suffix)]
            if hasattr(transformers, f"{family_prefix}Config") and hasattr(transformers, f"{family_prefix}ForCausalLM"):
                config_class, model_class = pruned_classes(family_prefix)
                return config_class if suffix == "Config" else model_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FUSED_PROJECTIONS", "LAYER_WIDTH_KEYS", "OUTPUT_BIAS_KEY", "ConcatenatedProjections", "EmptyAttention",
           "EmptyMLP", "LayerHeadsConfig", "fused_rows", "install_empty_blocks", "layer_widths", "pruned_classes",
           "resize_decoder_layers", "split_fused_projections"]
