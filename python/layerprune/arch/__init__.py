"""Architecture adapters: the one place that knows model families.

Each ``arch/<family>.py`` defines ``ADAPTER``, a :class:`~layerprune.arch.base.FamilyAdapter`; they are
found here by name, so adding a family is adding one file. The rest of the pipeline asks
:func:`adapter_for` (a model or a config) and never names a family. The GQA index map is
:mod:`layerprune.arch.gqa`, the parameter formula :mod:`layerprune.arch.budget`, and the classes a
pruned model is saved as :mod:`layerprune.arch.modeling_layerprune`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from functools import lru_cache
from typing import Any

from layerprune.arch.base import (
    ATTENTION_PROJECTIONS,
    LAYER_KWARGS,
    MLP_PROJECTIONS,
    OUTPUT_BIAS_KEY,
    FamilyAdapter,
    LayerGeometry,
    config_value,
    head_dim,
)
from layerprune.arch.budget import SHAPE_COLUMNS, LayerShape
from layerprune.arch.modeling_layerprune import EmptyAttention, EmptyMLP
from layerprune.errors import InternalError, ModelError

_NOT_FAMILIES = {"base", "budget", "gqa", "modeling_layerprune"}
PRUNED_MARKER_KEY = "layerprune"


@lru_cache(maxsize=1)
def adapters() -> tuple[FamilyAdapter, ...]:
    """Every family adapter, in module-name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_FAMILIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        adapter = getattr(module, "ADAPTER", None)
        if not isinstance(adapter, FamilyAdapter):
            raise InternalError(f"layerprune.arch.{info.name} defines no FamilyAdapter named ADAPTER")
        found.append(adapter)
    return tuple(found)


def supported_architectures() -> tuple[str, ...]:
    return tuple(a for adapter in adapters() for a in adapter.architectures)


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", None)
    return model_or_config if config is None else config


def find_adapter(model_or_config: Any) -> FamilyAdapter | None:
    """The adapter of a model, a transformers config or a ``config.json`` dict (dense or pruned), or None."""
    config = _config_of(model_or_config)
    architectures = list(config_value(config, "architectures", None) or [])
    model_type = config_value(config, "model_type", None)
    for adapter in adapters():
        if any(a in (*adapter.architectures, adapter.pruned_architecture) for a in architectures):
            return adapter
    if not architectures or model_type in {x for ad in adapters() for x in (ad.model_type, ad.pruned_model_type)}:
        for adapter in adapters():
            if model_type in (adapter.model_type, adapter.pruned_model_type):
                return adapter
    return None


def adapter_for(model_or_config: Any, where: str = "model") -> FamilyAdapter:
    """The adapter of a model or config; ModelError naming the supported families otherwise."""
    adapter = find_adapter(model_or_config)
    if adapter is not None:
        return adapter
    config = _config_of(model_or_config)
    architectures = list(config_value(config, "architectures", None) or [])
    if not architectures and config is not model_or_config:
        architectures = [type(model_or_config).__name__]  # a model built from a config that names none
    found = ", ".join(architectures) or f"model_type '{config_value(config, 'model_type', None)}'"
    raise ModelError(
        f"{where} is {found}, which layerprune does not support; supported architectures: "
        f"{', '.join(supported_architectures())}"
    )


# Config fields that size a model: each a positive integer (head_dim and num_key_value_heads may be absent).
GEOMETRY_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "intermediate_size", "vocab_size")


def check_geometry(model_or_config: Any, where: str = "model") -> None:
    """A config's sizes are positive integers and its heads divide: one ModelError naming the field otherwise,
    before anything is built from it (a negative or zero width, or KV heads that do not divide the heads)."""
    config = _config_of(model_or_config)
    values: dict[str, int] = {}
    for name in GEOMETRY_FIELDS:
        value = config_value(config, name, None)
        if value is None and name in ("num_key_value_heads", "head_dim"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{where}: config.json's {name} is {value!r}; it must be a positive integer")
        values[name] = value
    heads, kv = values["num_attention_heads"], values.get("num_key_value_heads", values["num_attention_heads"])
    if heads % kv:
        raise ModelError(f"{where}: config.json's num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")
    if "head_dim" not in values and values["hidden_size"] % heads:
        raise ModelError(f"{where}: config.json sets no head_dim and hidden_size {values['hidden_size']} is not a "
                         f"multiple of num_attention_heads {heads}")


def check_supported(model_or_config: Any, where: str = "model") -> FamilyAdapter:
    """:func:`adapter_for` and :func:`check_geometry`, under the name the entry points use before any work starts."""
    adapter = adapter_for(model_or_config, where)
    check_geometry(model_or_config, where)
    return adapter


def window_prefix_token(model_or_config: Any) -> int | None:
    """The token every evaluated window starts with, as context only: the BOS id for a family that needs it at the
    start of every sequence (``FamilyAdapter.window_bos``: Gemma), else None (LLM-Pruner's plain windows)."""
    adapter = find_adapter(model_or_config)
    if adapter is None or not adapter.window_bos:
        return None
    bos = config_value(_config_of(model_or_config), "bos_token_id")
    return None if bos is None else int(bos)


def gguf_window_prefix_token(metadata: dict[str, Any]) -> int | None:
    """:func:`window_prefix_token` of a GGUF file from its metadata (its architecture and BOS id)."""
    arch = metadata.get("general.architecture")
    if not any(a.gguf_architecture == arch and a.window_bos for a in adapters()):
        return None
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    return None if bos is None else int(bos)


def is_pruned_config(config: Any) -> bool:
    """Whether a config (or ``config.json`` dict) was written by layerprune's saving."""
    return config_value(config, PRUNED_MARKER_KEY, None) is not None


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a supported causal LM."""
    return adapter_for(model).decoder_layers(model)


def layer_geometries(model: Any) -> list[LayerGeometry]:
    """Every layer's widths, read from its weights."""
    adapter = adapter_for(model)
    return [adapter.geometry(model, layer) for layer in adapter.decoder_layers(model)]


def layer_shapes(model: Any) -> list[dict[str, int]]:
    """:func:`layer_geometries` as dicts: num_q_heads, num_kv_heads, head_dim, intermediate."""
    return [{"num_q_heads": g.num_q_heads, "num_kv_heads": g.num_kv_heads, "head_dim": g.head_dim,
             "intermediate": g.intermediate} for g in layer_geometries(model)]


def per_token_costs(model: Any, seq_len: int, dtype_bytes: int | None = None) -> dict[str, int]:
    """KV-cache bytes and FLOPs per token of a model, dense or pruned, from its layers' widths (read from the
    weights) and the formulas of :mod:`layerprune.arch.budget`: ``kv_cache_bytes`` at ``dtype_bytes`` per cached
    element (default: the parameters' element size) and ``flops`` of one token of a forward over ``seq_len``
    positions, ``lm_head`` included."""
    adapter = adapter_for(model)
    shape = adapter.layer_shape(model.config)
    if dtype_bytes is None:
        dtype_bytes = next(model.parameters()).element_size()
    kv = flops = 0
    for g in layer_geometries(model):
        layer = dataclasses.replace(shape, num_q_heads=max(g.num_q_heads, 1), num_kv_heads=max(g.num_kv_heads, 1),
                                    intermediate=g.intermediate)
        kv += layer.kv_cache_bytes(g.num_kv_heads, dtype_bytes)
        flops += layer.flops(g.num_kv_heads, g.intermediate, seq_len)
    return {"kv_cache_bytes": kv, "flops": flops + adapter.extra_flops(model.config), "seq_len": int(seq_len),
            "dtype_bytes": int(dtype_bytes)}


def check_consistency(model: Any) -> None:
    """Raise InternalError if any layer's shapes disagree.

    Attention: q rows = r * k rows = r * v rows with one integer r >= 1 shared by all layers, rows multiples of
    head_dim, o_proj columns = q rows, input widths and o_proj rows = hidden size. MLP: gate rows = up rows =
    down columns, gate/up columns and down rows = hidden size. Biases match their weights.
    """
    adapter = adapter_for(model)
    hd = head_dim(model.config)
    ratio = hidden = None
    for i, layer in enumerate(adapter.decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v, o = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight)
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        where = f"model.layers[{i}]"
        hidden = q.shape[1] if hidden is None else hidden
        for name, w, dim in (("q_proj", q, 1), ("k_proj", k, 1), ("v_proj", v, 1), ("o_proj", o, 0),
                             ("gate_proj", gate, 1), ("up_proj", up, 1), ("down_proj", down, 0)):
            if w.shape[dim] != hidden:
                raise InternalError(f"{where}: {name} weight {tuple(w.shape)} does not match hidden size {hidden}")
        if k.shape[0] % hd or q.shape[0] % hd or (k.shape[0] == 0) != (q.shape[0] == 0):
            raise InternalError(f"{where}: q rows {q.shape[0]} / k rows {k.shape[0]} are not multiples of head_dim {hd}, "
                                "both positive or both 0")
        if v.shape[0] != k.shape[0]:
            raise InternalError(f"{where}: v_proj rows {v.shape[0]} != k_proj rows {k.shape[0]}")
        if (k.shape[0] == 0) != isinstance(attn, EmptyAttention):
            raise InternalError(f"{where}: {type(attn).__name__} with {k.shape[0]} k_proj rows")
        if k.shape[0] and q.shape[0] % k.shape[0]:
            raise InternalError(f"{where}: q_proj rows {q.shape[0]} are not a multiple of k_proj rows {k.shape[0]}")
        if k.shape[0]:  # an empty attention (no head left) has no ratio
            layer_ratio = q.shape[0] // k.shape[0]
            ratio = layer_ratio if ratio is None else ratio
            if layer_ratio != ratio:
                raise InternalError(f"{where}: GQA ratio {layer_ratio} differs from the other layers' {ratio}")
            groups = getattr(attn, "num_key_value_groups", None)
            if groups is not None and groups != layer_ratio:
                raise InternalError(f"{where}: self_attn.num_key_value_groups={groups} but weights give ratio {layer_ratio}")
        if o.shape[1] != q.shape[0]:
            raise InternalError(f"{where}: o_proj columns {o.shape[1]} != q_proj rows {q.shape[0]}")
        if (gate.shape[0] == 0) != isinstance(mlp, EmptyMLP):
            raise InternalError(f"{where}: {type(mlp).__name__} with {gate.shape[0]} gate_proj rows")
        if not (gate.shape[0] == up.shape[0] == down.shape[1]):
            raise InternalError(f"{where}: MLP widths disagree: gate {gate.shape[0]}, up {up.shape[0]}, down columns {down.shape[1]}")
        for name, lin in adapter.projections(layer).items():
            if lin.bias is not None and lin.bias.shape[0] != lin.weight.shape[0]:
                raise InternalError(f"{where}: {name} bias length {lin.bias.shape[0]} != rows {lin.weight.shape[0]}")
            if lin.in_features != lin.weight.shape[1] or lin.out_features != lin.weight.shape[0]:
                raise InternalError(f"{where}: {name} in/out_features do not match its weight {tuple(lin.weight.shape)}")
        for name in adapter.unpruned_attention_parameters():
            norm = getattr(attn, name, None)
            if norm is None or norm.weight.shape != (hd,):
                raise InternalError(f"{where}: self_attn.{name} must be a [{hd}] per-head norm")
        for name, projection in adapter.sliced_attention_norms().items():
            norm, rows = getattr(attn, name, None), getattr(attn, projection).out_features
            if norm is None or norm.weight.shape != (rows,):
                raise InternalError(f"{where}: self_attn.{name} must be a [{rows}] norm over {projection}'s rows")


__all__ = [
    "ATTENTION_PROJECTIONS",
    "LAYER_KWARGS",
    "MLP_PROJECTIONS",
    "OUTPUT_BIAS_KEY",
    "PRUNED_MARKER_KEY",
    "SHAPE_COLUMNS",
    "FamilyAdapter",
    "LayerGeometry",
    "LayerShape",
    "adapter_for",
    "adapters",
    "check_consistency",
    "check_geometry",
    "check_supported",
    "config_value",
    "decoder_layers",
    "find_adapter",
    "gguf_window_prefix_token",
    "head_dim",
    "is_pruned_config",
    "layer_geometries",
    "layer_shapes",
    "per_token_costs",
    "supported_architectures",
    "window_prefix_token",
]
