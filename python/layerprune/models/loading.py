"""Finding and loading the causal language models layerprune prunes.

`--model` accepts three things:

* ``smollm2-135m``: the embedded SmolLM2-135M-Instruct (:mod:`layerprune.models.embedded`);
* a local folder in Hugging Face layout (``config.json`` + weights + tokenizer), including a
  folder written by layerprune's saving (its ``config.json`` carries a ``layerprune`` key);
* a Hugging Face Hub id, passed through to ``from_pretrained`` when a hub is reachable.

Any family with an adapter in :mod:`layerprune.arch` loads; others are refused before any weight is
read, with the supported architectures named. Loading never writes into the model folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from struct import error as struct_error
from typing import Any

import torch

from layerprune.arch import check_supported, find_adapter
from layerprune.errors import ModelError
from layerprune.models.checkpoint import check_checkpoint, check_finite
from layerprune.models.embedded import EMBEDDED_MODEL, SHIPPED_MODELS, ensure_embedded_model, ensure_shipped_model
from layerprune.models.pruned import is_pruned_folder, load_pruned, pruned_config, read_config_json


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith((".gguf", ".json", ".safetensors"))
    )


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path | str:
    """'smollm2-135m' or 'gemma3-270m' -> converted cache folder; an existing path -> Path; anything else -> hub id.

    Raises ModelError for a path that does not exist.
    """
    name = os.fspath(name_or_path)
    if not name:
        raise ModelError("--model is empty: pass 'smollm2-135m', a local model folder, or a Hugging Face hub id")
    if name.lower() == EMBEDDED_MODEL:
        return ensure_embedded_model()
    if name.lower() in SHIPPED_MODELS:
        return ensure_shipped_model(SHIPPED_MODELS[name.lower()])
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json (expected a Hugging Face model folder)")
        if path.is_file() and path.suffix != ".gguf":
            raise ModelError(f"model path {path} is a file; pass its folder (with config.json) or a .gguf file")
        return path
    if _looks_like_path(name):
        raise ModelError(f"model path {name} does not exist")
    return name


def read_gguf(path: str | os.PathLike[str]) -> Any:
    """``gguf.GGUFReader`` of a file, checked: a truncated header or tensor table, or tensors whose dimensions
    put their data past the end of the file, are one ModelError (the reader itself fails in many ways)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        size = os.path.getsize(path)
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size or int(tensor.data.nbytes) != int(tensor.n_bytes):
                raise ValueError(f"tensor {tensor.name} of shape {[int(d) for d in tensor.shape]} does not fit "
                                 f"in the file's {size:,} bytes")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct_error, MemoryError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {_first_line(exc)})") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    return reader


def _is_pruned_folder(resolved: Path | str) -> bool:
    return isinstance(resolved, Path) and is_pruned_folder(resolved)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _hub_error(name: str, exc: BaseException) -> ModelError:
    return ModelError(
        f"cannot load model '{name}': not 'smollm2-135m', not a local folder, and the Hugging Face hub "
        f"could not provide it ({type(exc).__name__}: {_first_line(exc)})"
    )


def load_config(name_or_path: str | os.PathLike[str]) -> Any:
    """The transformers config of a model (no weights are read)."""
    from transformers import AutoConfig

    resolved = resolve_model(name_or_path)
    if isinstance(resolved, Path) and resolved.is_dir():
        raw = read_config_json(resolved)
        if raw is not None and find_adapter(raw) is not None:  # sizes checked before transformers builds on them
            check_checkpoint(resolved, raw, tensors=False)
    if isinstance(resolved, Path) and resolved.is_file():
        read_gguf(resolved)  # whole and consistent, before transformers reads it
    try:
        if isinstance(resolved, Path) and resolved.is_file():
            return AutoConfig.from_pretrained(resolved.parent, gguf_file=resolved.name)
        if _is_pruned_folder(resolved):
            return pruned_config(resolved)  # layerprune's own class: no remote code is run
        return AutoConfig.from_pretrained(resolved)
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, HTTP errors ...
        if isinstance(resolved, Path):
            raise ModelError(f"cannot read the config of {resolved}: {type(exc).__name__}: {_first_line(exc)}") from None
        raise _hub_error(os.fspath(name_or_path), exc) from None


def _load_pruned(path: Path, dtype: torch.dtype, device: str | torch.device, require_tokenizer: bool) -> tuple[Any, Any]:
    check_checkpoint(path, pruned_config(path))
    model, tokenizer = load_pruned(path, dtype=dtype, device=device)
    check_finite(model, f"model '{path}'")
    if tokenizer is None and require_tokenizer:
        raise ModelError(f"pruned model {path} has no tokenizer files")
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def load_tokenizer(source: Path | str, name: str, required: bool, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        if gguf_file is not None:
            return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        if not required:
            return None
        raise ModelError(f"model '{name}' has no usable tokenizer ({type(exc).__name__}: {_first_line(exc)})") from None


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    require_tokenizer: bool = True,
) -> tuple[Any, Any]:
    """Load (model, tokenizer); the model is in eval mode on `device` in `dtype`.

    Raises ModelError for a missing path, a hub id that cannot be fetched, or a model that is
    of an unsupported family. With ``require_tokenizer=False`` a folder without tokenizer gives None.
    """
    from transformers import AutoModelForCausalLM

    name = os.fspath(name_or_path)
    resolved = resolve_model(name)
    if _is_pruned_folder(resolved):
        return _load_pruned(resolved, dtype, device, require_tokenizer)  # type: ignore[arg-type]

    gguf_file = None
    source: Path | str = resolved
    if isinstance(resolved, Path) and resolved.is_file():
        source, gguf_file = resolved.parent, resolved.name
    config = load_config(name)
    check_supported(config, f"model '{name}'")  # before any weight is read
    if isinstance(resolved, Path) and gguf_file is None:
        check_checkpoint(resolved, config)  # the weights are whole and are what config.json says
    try:
        if gguf_file is not None:
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as exc:
        if isinstance(resolved, Path):
            raise ModelError(f"cannot load model weights from {resolved}: {type(exc).__name__}: {_first_line(exc)}") from None
        raise _hub_error(name, exc) from None
    check_finite(model, f"model '{name}'")
    tokenizer = load_tokenizer(source, name, require_tokenizer, gguf_file)
    torch.nn.Module.to(model, device)  # (transformers wraps .to with a signature mypy misreads)
    return model.eval(), tokenizer


__all__ = ["load_config", "load_model", "read_gguf", "resolve_model"]
