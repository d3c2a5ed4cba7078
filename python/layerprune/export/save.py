"""Save pruned models whose layers have different widths, of any supported family.

A saved folder holds model.safetensors, config.json (the family's pruned model_type, e.g.
"layerprune_qwen2", its per-layer widths, an auto_map to the copied modeling_layerprune.py, a `layerprune`
marker, and every other setting of the dense config: rope scaling, sliding window, biases, norms),
generation_config.json, the tokenizer files (if a tokenizer is given) and report.json (if a report is
given). It loads with `layerprune.load_pruned(folder)` or, without layerprune installed, with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerprune.arch import PRUNED_MARKER_KEY, FamilyAdapter, adapter_for, check_consistency, layer_shapes
from layerprune.arch import modeling_layerprune as modeling
from layerprune.atomic import (
    file_mode,
    json_safe,
    remove_stale_siblings,
    replace_dir,
    restore_interrupted,
    temp_sibling_dir,
)
from layerprune.errors import InvalidInputError, ModelError
from layerprune.models import FORMAT_VERSION
from layerprune.faults import fault_point

__all__ = ["MODELING_FILE", "plain_config_obstacle", "save_pruned"]

MODELING_FILE = "modeling_layerprune.py"
WEIGHTS_FILE = "model.safetensors"


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


def check_layout(model: Any, adapter: FamilyAdapter) -> None:
    """Every projection's bias presence matches the family's bias flags for this config."""
    flags = adapter.projection_biases(model.config)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for name, lin in adapter.projections(layer).items():
            if (lin.bias is not None) != flags[name.rsplit(".", 1)[-1]]:
                raise ModelError(f"model.layers[{i}]: {name} bias presence disagrees with the {adapter.name} config")


def pruned_model_config(model: Any, adapter: FamilyAdapter, tie: bool) -> dict[str, Any]:
    shapes = layer_shapes(model)
    config = model.config.to_dict()
    head_dim = shapes[0]["head_dim"] if shapes else config.get("head_dim")
    dtype = next(model.parameters()).dtype
    module = MODELING_FILE.removesuffix(".py")
    config.update(
        {
            "model_type": adapter.model_type,
            "architectures": [adapter.pruned_architecture],
            "auto_map": {"AutoModelForCausalLM": f"{module}.{adapter.pruned_architecture}"},
            "head_dim": head_dim,
            "layer_num_attention_heads": [s["num_q_heads"] for s in shapes],
            "layer_num_key_value_heads": [s["num_kv_heads"] for s in shapes],
            "layer_intermediate_sizes": [s["intermediate"] for s in shapes],
            "tie_word_embeddings": tie,
            "dtype": str(dtype).removeprefix("torch."),
            PRUNED_MARKER_KEY: {"version": _version(), "format": FORMAT_VERSION, "family": adapter.name},
        }
    )
    config.pop("torch_dtype", None)
    config.pop("_name_or_path", None)
    return config


LAYER_WIDTH_LISTS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes")
WIDTHS_DIFFER = "the layers' widths differ"


def plain_config_obstacle(model: Any) -> str | None:
    """Why the family's own config cannot describe ``model`` (None when it can), in words: the layers' widths
    differ, o_proj / down_proj carry a compensation bias the family's config cannot declare, or the hidden size
    is not a multiple of the kept query heads (transformers' family configs refuse it)."""
    obstacle = adapter_for(model).plain_save_obstacle
    if obstacle is not None:
        return obstacle
    widths = {(s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) for s in layer_shapes(model)}
    if len(widths) != 1:
        return WIDTHS_DIFFER
    if model.config.to_dict().get(modeling.OUTPUT_BIAS_KEY):
        return ("o_proj / down_proj carry the refit's compensation bias (refit lstsq-bias or bias), which the "
                "family's config cannot declare")
    ((heads, _, _),) = widths
    if int(model.config.hidden_size) % heads:
        return (f"hidden_size {model.config.hidden_size} is not a multiple of the {heads} query heads kept "
                "(transformers' family configs refuse it)")
    return None


def plain_family_config(model: Any, adapter: FamilyAdapter, tie: bool) -> dict[str, Any] | None:
    """The family's own config for a pruned model whose layers all have the same widths: the dense config with
    only ``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` changed (``head_dim`` stays
    written out), which transformers, vLLM and llama.cpp's converter load with no remote code. None when
    :func:`plain_config_obstacle` names a reason it cannot."""
    if plain_config_obstacle(model) is not None:
        return None
    shapes = layer_shapes(model)
    ((heads, kv_heads, intermediate),) = {(s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) for s in shapes}
    config = model.config.to_dict()
    for key in ("auto_map", "torch_dtype", "_name_or_path", *LAYER_WIDTH_LISTS):
        config.pop(key, None)
    config.update({
        "model_type": adapter.model_type,
        "architectures": [adapter.architectures[0]],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "head_dim": shapes[0]["head_dim"],
        "tie_word_embeddings": tie,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        PRUNED_MARKER_KEY: {"version": _version(), "format": FORMAT_VERSION, "family": adapter.name, "plain": True},
    })
    return config


def _weights(model: nn.Module, tie: bool) -> dict[str, torch.Tensor]:
    """State dict on CPU; with tied embeddings the shared tensor is stored once (as the embedding)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if tie and name == "lm_head.weight":
            continue
        state[name] = tensor.detach().to("cpu").contiguous().clone()
    return state


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"out_dir: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InvalidInputError(f"out_dir: {out} exists and is not empty; pass --overwrite to replace it")


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    plain_config: bool = True,
    extra_files: Mapping[str, Callable[[Path], Any]] | None = None,
) -> Path:
    """Write a pruned (or dense) model to out_dir and return its path; the model is not modified. ``extra_files``:
    name -> a function writing that file at the path it is given (a plot), inside the folder before it is moved.

    A model whose layers all have the same widths is saved under the family's own config (:func:`plain_family_config`;
    ``plain_config=False`` keeps the remote-code layout); any other gets per-layer widths and the remote code.

    Everything is written to a temporary folder next to out_dir, fsync'd and renamed (or swapped) into place at
    the end (:func:`layerprune.atomic.replace_dir`), so a failure leaves no partial folder and an overwritten
    folder is at every moment the old one or the new one. A non-empty out_dir is refused unless overwrite is
    true. Files and folders get the modes of a plain save (the umask is respected).
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser().absolute()
    restore_interrupted(out)  # a crash between two renames left the old folder aside: put it back first
    remove_stale_siblings(out)
    prepare_out_dir(out, overwrite)
    adapter = adapter_for(model, "model")
    check_consistency(model)
    check_layout(model, adapter)
    tie = _tied(model)  # decided from the tensors, not the config flag, so the reload matches the model
    plain = plain_family_config(model, adapter, tie) if plain_config else None
    config = plain if plain is not None else pruned_model_config(model, adapter, tie)
    report_text = report_json_text(report)

    tmp = temp_sibling_dir(out)
    try:
        write_safetensors(save_file, _weights(model, tie), tmp / WEIGHTS_FILE)
        write_folder_files(tmp, config, getattr(model, "generation_config", None), tokenizer, report_text)
        for name, write in (extra_files or {}).items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise InvalidInputError(f"extra_files: {name!r} is not a plain file name")
            write(tmp / name)
            os.chmod(tmp / name, file_mode())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_safetensors(save_file: Any, tensors: dict[str, Any], path: Path) -> None:
    """``save_file(tensors, path)``, with safetensors' I/O failures (``SafetensorError``, not an ``OSError``: "I/O
    error: File too large (os error 27)" on a full disk or past a file-size limit) raised as the ``OSError`` they
    are, naming the file."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
        fault_point("save-file")
    except SafetensorError as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, f"{os.strerror(code)}: the disk or the file-size limit is full while writing", str(path)) \
            from None


def report_json_text(report: dict[str, Any] | None) -> str | None:
    """report.json's text (strict JSON), or None without a report."""
    if report is None:
        return None
    if not isinstance(report, dict):
        raise InvalidInputError(f"report: expected a dict, got {type(report).__name__}")
    try:
        return json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n"
    except InvalidInputError as err:
        raise InvalidInputError(f"report: {err}") from None


def write_folder_files(tmp: Path, config: dict[str, Any], generation_config: Any, tokenizer: Any,
                        report_text: str | None) -> None:
    """Everything of a pruned folder but the weights: config, generation config, the remote-code module, the
    tokenizer and report.json; then every file gets a plain file's mode."""
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    fault_point("save-file")
    if generation_config is not None:
        generation_config.to_json_file(str(tmp / "generation_config.json"))
    if "auto_map" in config:  # a plain config needs no remote code
        shutil.copyfile(modeling.__file__, tmp / MODELING_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
        fault_point("save-file")
    if report_text is not None:
        (tmp / "report.json").write_text(report_text)
        fault_point("save-file")
    for path in tmp.rglob("*"):
        if path.is_file():
            os.chmod(path, file_mode())
