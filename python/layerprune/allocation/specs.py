"""Allocation problems from a model's config and in their JSON form (``layerprune allocate --spec``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.allocation.solve import AllocationSpec, f64_array
from layerprune.arch import adapter_for
from layerprune.arch.budget import SHAPE_COLUMNS, LayerShape
from layerprune.errors import InvalidInputError


def spec_from_model_config(config: Any, ratio: float | None, **constraints: Any) -> AllocationSpec:
    """An :class:`AllocationSpec` for a model of any supported family from its transformers config (or
    the ``config.json`` dict). Parameters are counted like ``model.parameters()``, by the family's
    adapter: token embeddings, ``lm_head`` unless ``tie_word_embeddings``, the final norm
    (``extra_params``), and per layer two norms (``norm_params = 2 * hidden``), q/k/v/o and gate/up/down
    with the family's biases, and per-head q/k norms where the family has them; ``extra_flops`` is the
    ``lm_head``'s ``2 * vocab * hidden``. ``constraints`` are further AllocationSpec fields (importance,
    mlp_step, protected, kv_cache_ratio, ...)."""
    unknown = set(constraints) - set(AllocationSpec.__dataclass_fields__)
    if unknown:
        raise InvalidInputError(f"constraints: unknown field(s) {sorted(unknown)}")
    adapter = adapter_for(config, "config")
    try:
        layer = adapter.layer_shape(config)
        n_layers = adapter.num_layers(config)
        extra = adapter.extra_params(config)
        constraints.setdefault("extra_flops", adapter.extra_flops(config))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"config: missing or non-integer field ({exc})") from None
    return AllocationSpec(ratio=None if ratio is None else float(ratio), layers=[layer] * n_layers, extra_params=extra,
                          **constraints)


_SHAPE_KEYS = ("hidden", "num_q_heads", "num_kv_heads", "head_dim", "intermediate")
_PER_LAYER_ARRAYS = (("importance", "importance"), ("attn_importance", "attn_importance"), ("mlp_importance", "mlp_importance"))
_SCALAR_FIELDS = (
    "extra_params", "mlp_step", "min_kv_groups", "min_mlp", "min_rate", "max_rate", "min_attn_rate", "max_attn_rate",
    "min_mlp_rate", "max_mlp_rate", "tie", "attn_layer_start", "attn_layer_end", "mlp_layer_start", "mlp_layer_end",
    "min_effective_rate", "layer_rate", "log_transform", "alpha", "kv_cache_ratio", "flops_ratio", "flops_seq_len",
    "kv_cache_dtype_bytes", "extra_flops", "dp_method",
)  # fmt: skip


def spec_from_json(data: Mapping[str, Any]) -> AllocationSpec:
    """Build a spec from its JSON form (see :func:`spec_to_json`). ``ratio`` may be null when
    ``kv_cache_ratio`` or ``flops_ratio`` is given; ``meta`` (an object: provenance, best known
    objective, ...) is accepted and ignored."""
    if not isinstance(data, Mapping):
        raise InvalidInputError("spec: expected a JSON object")
    known = {"ratio", "layers", "protected", "importance", "attn_importance", "mlp_importance", "meta", *_SCALAR_FIELDS}
    unknown = set(data) - known
    if unknown:
        raise InvalidInputError(f"spec: unknown field(s) {sorted(unknown)}")
    if "meta" in data and not isinstance(data["meta"], Mapping):
        raise InvalidInputError("meta: expected a JSON object")
    if "ratio" not in data and "kv_cache_ratio" not in data and "flops_ratio" not in data:
        raise InvalidInputError("ratio: missing (give ratio, kv_cache_ratio or flops_ratio)")
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise InvalidInputError("layers: expected a non-empty list of layer objects")
    layers: list[LayerShape] = []
    per_layer: dict[str, list[Any]] = {}
    for i, obj in enumerate(raw_layers):
        if not isinstance(obj, Mapping):
            raise InvalidInputError(f"layers[{i}]: expected an object")
        missing = [k for k in _SHAPE_KEYS if k not in obj]
        if missing:
            raise InvalidInputError(f"layers[{i}].{missing[0]}: missing")
        try:
            # "attn_bias" (older specs, Llama's attention_bias) puts a bias on all four projections.
            attn_bias = bool(obj.get("attn_bias", False))
            layers.append(
                LayerShape(
                    *(int(obj[k]) for k in _SHAPE_KEYS),
                    qkv_bias=bool(obj.get("qkv_bias", attn_bias)),
                    o_bias=bool(obj.get("o_bias", attn_bias)),
                    mlp_bias=bool(obj.get("mlp_bias", False)),
                    qk_norm=bool(obj.get("qk_norm", False)),
                    norm_params=int(obj.get("norm_params", 0)),
                    group_norm=bool(obj.get("group_norm", False)),
                )
            )
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"layers[{i}]: shape fields must be integers ({exc})") from None
        for key in ("importance", "attn_importance", "mlp_importance", "attn_curve", "mlp_curve"):
            if key in obj:
                per_layer.setdefault(key, [None] * len(raw_layers))[i] = obj[key]
    kwargs: dict[str, Any] = {k: data[k] for k in _SCALAR_FIELDS if k in data}
    for key, target in _PER_LAYER_ARRAYS:
        if key in data:
            kwargs[target] = f64_array(key, data[key])
    for key in ("importance", "attn_importance", "mlp_importance"):
        if key in per_layer:
            values = per_layer[key]
            if any(v is None for v in values):
                raise InvalidInputError(f"layers[{values.index(None)}].{key}: missing (other layers have it)")
            kwargs[key] = f64_array(key, values)
    for key, target in (("attn_curve", "attn_curves"), ("mlp_curve", "mlp_curves")):
        if key in per_layer:
            values = per_layer[key]
            if any(v is None for v in values):
                raise InvalidInputError(f"layers[{values.index(None)}].{key}: missing (other layers have it)")
            kwargs[target] = [f64_array(f"layers[{i}].{key}", v) for i, v in enumerate(values)]
    if "protected" in data:
        kwargs["protected"] = tuple(int(p) for p in data["protected"])
    try:
        ratio = data.get("ratio")
        return AllocationSpec(ratio=None if ratio is None else float(ratio), layers=layers, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"spec: {exc}") from None


def load_spec(path: str | os.PathLike[str]) -> AllocationSpec:
    """Read a spec JSON file (format of :func:`spec_to_json`)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"spec: file {p} not found") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"spec: cannot read {p}: {exc}") from None
    return spec_from_json(data)


def spec_to_json(spec: AllocationSpec) -> dict[str, Any]:
    """The JSON form of a spec: ``ratio``, ``layers`` (shape fields plus per-layer
    ``importance``/``attn_importance``/``mlp_importance``/``attn_curve``/``mlp_curve``),
    ``protected`` and every other field at top level."""
    layers = []
    for i, s in enumerate(spec.layers):
        obj: dict[str, Any] = {name: getattr(s, name) for name in SHAPE_COLUMNS}
        for key in ("importance", "attn_importance", "mlp_importance"):
            arr = getattr(spec, key)
            if arr is not None:
                obj[key] = float(np.asarray(arr, dtype=np.float64)[i])
        if spec.attn_curves is not None:
            obj["attn_curve"] = [float(v) for v in spec.attn_curves[i]]
        if spec.mlp_curves is not None:
            obj["mlp_curve"] = [float(v) for v in spec.mlp_curves[i]]
        layers.append(obj)
    out: dict[str, Any] = {"ratio": spec.ratio, "layers": layers, "protected": [int(p) for p in spec.protected]}
    for key in _SCALAR_FIELDS:
        out[key] = getattr(spec, key)
    return out


__all__ = [
    "load_spec",
    "spec_from_json",
    "spec_from_model_config",
    "spec_to_json",
]
