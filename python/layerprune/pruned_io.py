"""Save and reload pruned Llama models whose layers have different widths.

A saved folder holds model.safetensors, config.json (model_type "layerprune_llama", per-layer widths, an
auto_map to the copied modeling_layerprune_llama.py, and a `layerprune` marker), generation_config.json,
the tokenizer files (if a tokenizer is given) and report.json (if a report is given). It loads with
`load_pruned(folder)` or, without layerprune installed, with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from layerprune import modeling_layerprune_llama as modeling
from layerprune.errors import InvalidInputError, ModelError
from layerprune.pruning import check_consistency, layer_shapes

__all__ = ["FORMAT_VERSION", "is_pruned_folder", "load_pruned", "save_pruned"]

FORMAT_VERSION = 1
MODELING_FILE = "modeling_layerprune_llama.py"
WEIGHTS_FILE = "model.safetensors"
_SUPPORTED_MODEL_TYPES = ("llama", modeling.LayerpruneLlamaConfig.model_type)


def _version() -> str:
    from layerprune import __version__

    return __version__


def _tied(model: nn.Module) -> bool:
    """Whether lm_head shares its weight tensor with the input embedding."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None:
        return False
    a, b = lm_head.weight, embed.weight
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype)


def _check_llama_layout(model: Any) -> None:
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model: model_type {model_type!r} is not supported for saving (expected one of {_SUPPORTED_MODEL_TYPES})")
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for name, lin, flag in (("q_proj", attn.q_proj, config.attention_bias), ("k_proj", attn.k_proj, config.attention_bias),
                                ("v_proj", attn.v_proj, config.attention_bias), ("o_proj", attn.o_proj, config.attention_bias),
                                ("gate_proj", mlp.gate_proj, config.mlp_bias), ("up_proj", mlp.up_proj, config.mlp_bias),
                                ("down_proj", mlp.down_proj, config.mlp_bias)):
            if (lin.bias is not None) != bool(flag):
                raise ModelError(f"model.layers[{i}]: {name} bias presence disagrees with the config's bias flag")


def _pruned_config(model: Any, tie: bool) -> dict[str, Any]:
    shapes = layer_shapes(model)
    config = model.config.to_dict()
    head_dim = shapes[0]["head_dim"] if shapes else config.get("head_dim")
    dtype = next(model.parameters()).dtype
    config.update(
        {
            "model_type": modeling.LayerpruneLlamaConfig.model_type,
            "architectures": ["LayerpruneLlamaForCausalLM"],
            "auto_map": {
                "AutoConfig": "modeling_layerprune_llama.LayerpruneLlamaConfig",
                "AutoModelForCausalLM": "modeling_layerprune_llama.LayerpruneLlamaForCausalLM",
            },
            "head_dim": head_dim,
            "layer_num_attention_heads": [s["num_q_heads"] for s in shapes],
            "layer_num_key_value_heads": [s["num_kv_heads"] for s in shapes],
            "layer_intermediate_sizes": [s["intermediate"] for s in shapes],
            "tie_word_embeddings": tie,
            "dtype": str(dtype).removeprefix("torch."),
            "layerprune": {"version": _version(), "format": FORMAT_VERSION},
        }
    )
    config.pop("torch_dtype", None)
    config.pop("_name_or_path", None)
    return config


def _weights(model: nn.Module, tie: bool) -> dict[str, torch.Tensor]:
    """State dict on CPU; with tied embeddings the shared tensor is stored once (as the embedding)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().to("cpu").contiguous().clone()
    return state


def _json_safe(value: Any) -> Any:
    """Report values as JSON: NaN/inf become null, tensors and numpy scalars become plain numbers or lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        converted = value.tolist()
        return converted if isinstance(converted, (bool, int, str)) else _json_safe(converted)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InvalidInputError(f"report: value of type {type(value).__name__} cannot be written as JSON")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"out_dir: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InvalidInputError(f"out_dir: {out} exists and is not empty; pass --overwrite to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is first renamed aside, then deleted once tmp is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    aside.rmdir()
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a pruned (or dense) Llama to out_dir and return its path; the model is not modified.

    Everything is written to a temporary folder next to out_dir and renamed at the end, so a failure leaves
    no partial folder. A non-empty out_dir is refused unless overwrite is true.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser().absolute()
    _prepare_out_dir(out, overwrite)
    check_consistency(model)
    _check_llama_layout(model)
    tie = _tied(model)  # decided from the tensors, not the config flag, so the reload matches the model
    config = _pruned_config(model, tie)
    report_text = None
    if report is not None:
        if not isinstance(report, dict):
            raise InvalidInputError(f"report: expected a dict, got {type(report).__name__}")
        report_text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(_weights(model, tie), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.to_json_file(str(tmp / "generation_config.json"))
        shutil.copyfile(modeling.__file__, tmp / MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if report_text is not None:
            (tmp / "report.json").write_text(report_text)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_pruned_folder(path: str | os.PathLike[str]) -> bool:
    """Whether path is a folder whose config.json carries the `layerprune` marker."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return False
    try:
        return "layerprune" in json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def load_pruned(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load a folder written by save_pruned: (model in eval mode, tokenizer or None)."""
    folder = Path(path).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"path: {folder} has no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"path: {config_path} is not valid JSON ({err})") from None
    marker = raw.get("layerprune")
    if not isinstance(marker, dict):
        raise ModelError(f"path: {folder} was not saved by layerprune (config.json has no `layerprune` entry)")
    if int(marker.get("format", 0)) > FORMAT_VERSION:
        raise ModelError(f"path: {folder} uses layerprune format {marker.get('format')}, this version reads up to {FORMAT_VERSION}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInputError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    try:
        model: Any = modeling.LayerpruneLlamaForCausalLM.from_pretrained(str(folder), **_dtype_kwargs(dtype))
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"path: cannot load the pruned model from {folder}: {err}") from None
    model.to(device).eval()
    expected = list(zip(raw.get("layer_num_attention_heads", []), raw.get("layer_num_key_value_heads", []),
                        raw.get("layer_intermediate_sizes", [])))
    found = [(s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) for s in layer_shapes(model)]
    if expected != found:
        raise ModelError(f"path: layer widths {found} do not match config.json {expected}")
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        # Passing the config stops AutoTokenizer from resolving config.json's auto_map (a trust_remote_code prompt).
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=model.config)
    return model, tokenizer
