"""Reading a folder that layerprune's saving wrote: per-layer widths, any supported family.

The folder's ``config.json`` carries a ``layerprune`` marker, the family's pruned model_type
(``layerprune_<model_type>``) and the per-layer widths; the model class comes from
:mod:`layerprune.arch.modeling_layerprune`, the same file the folder carries for ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerprune.arch import PRUNED_MARKER_KEY, find_adapter, layer_shapes, supported_architectures
from layerprune.arch.modeling_layerprune import pruned_classes
from layerprune.errors import InvalidInputError, ModelError

FORMAT_VERSION = 2


def read_config_json(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``config.json`` of a folder as a dict, None when there is none; ModelError when it is not JSON."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {config_path}: {err}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{config_path} is not a JSON object")
    return raw


def is_pruned_folder(path: str | os.PathLike[str]) -> bool:
    """Whether path is a folder whose config.json carries the `layerprune` marker."""
    try:
        raw = read_config_json(path) if Path(path).is_dir() else None
    except ModelError:
        return False
    return raw is not None and PRUNED_MARKER_KEY in raw


def _pruned_classes(folder: Path, raw: dict[str, Any]) -> tuple[type, type]:
    adapter = find_adapter(raw)
    if adapter is None:
        raise ModelError(f"path: {folder} holds model_type {raw.get('model_type')!r}; supported architectures: "
                         f"{', '.join(supported_architectures())}")
    return pruned_classes(adapter.transformers_prefix)


def pruned_config(path: str | os.PathLike[str]) -> Any:
    """The config of a pruned folder, read with layerprune's own config class (no remote code runs)."""
    folder = Path(path).expanduser()
    raw = read_config_json(folder)
    if raw is None or PRUNED_MARKER_KEY not in raw:
        raise ModelError(f"path: {folder} was not saved by layerprune (config.json has no `layerprune` entry)")
    config_class, _ = _pruned_classes(folder, raw)
    if _is_plain(raw):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder))
    return config_class.from_pretrained(str(folder))


def _is_plain(raw: dict[str, Any]) -> bool:
    """Saved under the family's own config (every layer at the same widths): no remote code."""
    marker = raw.get(PRUNED_MARKER_KEY)
    return isinstance(marker, dict) and bool(marker.get("plain"))


def _expected_widths(raw: dict[str, Any]) -> list[tuple[Any, Any, Any]]:
    if _is_plain(raw):
        heads = raw.get("num_attention_heads")
        return [(heads, raw.get("num_key_value_heads", heads), raw.get("intermediate_size"))] * int(
            raw.get("num_hidden_layers", 0))
    return list(zip(raw.get("layer_num_attention_heads", []), raw.get("layer_num_key_value_heads", []),
                    raw.get("layer_intermediate_sizes", [])))


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_pruned(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load a folder written by save_pruned: (model in eval mode, tokenizer or None)."""
    folder = Path(path).expanduser()
    raw = read_config_json(folder)
    if raw is None:
        raise ModelError(f"path: {folder} has no config.json")
    marker = raw.get(PRUNED_MARKER_KEY)
    if not isinstance(marker, dict):
        raise ModelError(f"path: {folder} was not saved by layerprune (config.json has no `layerprune` entry)")
    if int(marker.get("format", 0)) > FORMAT_VERSION:
        raise ModelError(f"path: {folder} uses layerprune format {marker.get('format')}, this version reads up to {FORMAT_VERSION}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInputError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    _, model_class = _pruned_classes(folder, raw)
    if _is_plain(raw):
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    try:
        model: Any = model_class.from_pretrained(str(folder), **_dtype_kwargs(dtype))
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"path: cannot load the pruned model from {folder}: {err}") from None
    model.to(device).eval()
    expected = _expected_widths(raw)
    found = [(s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) for s in layer_shapes(model)]
    if expected != found:
        raise ModelError(f"path: layer widths {found} do not match config.json {expected}")
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        # Passing the config stops AutoTokenizer from resolving config.json's auto_map.
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=model.config)
    return model, tokenizer


__all__ = ["FORMAT_VERSION", "is_pruned_folder", "load_pruned", "pruned_config", "read_config_json"]
