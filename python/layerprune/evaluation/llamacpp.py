"""Running a GGUF file in llama.cpp (the ``llama-cpp-python`` package, extra ``llamacpp``): logits, tokens and
perplexity with the same protocol as :func:`layerprune.evaluation.perplexity`.

Every window is evaluated in a fresh context (the KV cache cleared), with logits kept for every position, so
a window's NLL is that of transformers' forward over the same ids.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.errors import DataError, InvalidInputError, ModelError

INSTALL_HINT = "pip install 'layerprune[llamacpp]' (or pip install llama-cpp-python)"


def llama_cpp_module() -> Any:
    """The ``llama_cpp`` module, or ModelError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ModelError(f"running a GGUF file needs llama-cpp-python ({err}); {INSTALL_HINT}") from None
    _close_null_files_at_exit()
    return llama_cpp


@functools.cache
def _close_null_files_at_exit() -> None:
    """llama-cpp-python (0.3.36) opens /dev/null twice when it is imported (``llama_cpp._utils``, to silence
    llama.cpp's logs) and never closes it: a ResourceWarning at every exit. Closed at exit, after any use."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None and hasattr(handle, "close"):
            atexit.register(handle.close)


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp on the CPU, for next-token logits over windows of ids."""

    def __init__(self, path: str | os.PathLike[str], n_ctx: int = 512, threads: int | None = None,
                 f32_cache: bool = True):
        """``f32_cache``: keep K and V in float32 (llama.cpp's default is f16), so that an f32 file computes
        what transformers computes in float32, up to summation order."""
        llama_cpp = llama_cpp_module()
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelError(f"GGUF file {self.path} does not exist")
        threads = threads or os.cpu_count() or 1
        cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_threads=threads, n_threads_batch=threads, logits_all=True,
                                       n_gpu_layers=0, verbose=False, **cache)
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"llama.cpp cannot load {self.path}: {err}") from None
        self.n_ctx = n_ctx
        self.n_vocab = int(self.llm.n_vocab())

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenization of ``text`` with the file's defaults (BOS only where the file says so)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def logits(self, ids: Any) -> np.ndarray:
        """``[len(ids), vocab]`` float32 logits of one sequence evaluated from an empty cache."""
        ids = [int(i) for i in ids]
        if not 0 < len(ids) <= self.n_ctx:
            raise InvalidInputError(f"a sequence of {len(ids)} ids does not fit a context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


def _window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Summed next-token NLL of one window, in float64."""
    scores = logits[:-1].astype(np.float64)
    top = scores.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
    return float((log_norm - scores[np.arange(len(window) - 1), window[1:]]).sum())


def gguf_perplexity(model: LlamaCppModel, tokens: Any, seq_len: int = 128, progress: bool = False,
                    prefix_token: int | None | str = "family") -> dict[str, Any]:
    """Perplexity of a llama.cpp model on ``tokens`` with non-overlapping windows (the protocol of
    :func:`layerprune.evaluation.perplexity`, its window prefix read from the file's architecture and BOS id);
    same keys in the result."""
    from tqdm.auto import tqdm

    from layerprune.arch import gguf_window_prefix_token

    prefix = gguf_window_prefix_token(model.metadata()) if prefix_token == "family" else prefix_token

    stream = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if seq_len < 2:
        raise InvalidInputError(f"seq_len must be at least 2; got {seq_len}")
    windows = stream.size // seq_len
    if windows == 0:
        raise DataError(f"{stream.size} tokens do not fill one window of seq_len {seq_len}")
    total = 0.0
    for w in tqdm(range(windows), desc="llama.cpp ppl", disable=not progress):
        window = stream[w * seq_len:(w + 1) * seq_len]
        if prefix is None:
            total += _window_nll(model.logits(window), window)
        else:
            total += _window_nll(model.logits([int(prefix), *window.tolist()])[1:], window)
    predicted = windows * (seq_len - 1)
    nll = total / predicted
    return {"ppl": math.exp(nll), "nll": nll, "tokens": windows * seq_len, "predicted_tokens": predicted,
            "windows": windows, "seq_len": seq_len, "window_prefix": prefix}


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _component(name: str) -> str | None:
    """The :func:`layerprune.models.count_parameters` component of a GGUF tensor (None: not a parameter)."""
    if name.startswith("token_embd."):
        return "embeddings"
    if name.startswith("output."):
        return "lm_head"
    if name.startswith("rope_freqs."):
        return None  # RoPE frequency factors: a buffer in transformers, not a parameter
    if name.startswith("output_norm.") or name.endswith(("attn_norm.weight", "ffn_norm.weight")):
        return "norms"
    if ".attn_" in name:
        return "attention"
    if ".ffn_" in name:
        return "mlp"
    return "other"


def gguf_summary(path: str | os.PathLike[str]) -> tuple[dict[str, int], dict[str, Any]]:
    """``(parameters by component, model info)`` of a GGUF file, in the shapes of
    :func:`layerprune.models.count_parameters` and :func:`layerprune.models.model_info`."""
    from layerprune.models import read_gguf

    reader = read_gguf(path)
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head", "other", "decoder_layers"), 0)
    for tensor in reader.tensors:
        component = _component(tensor.name)
        if component is None:
            continue
        n = int(np.prod([int(x) for x in tensor.shape]))
        counts[component] += n
        if tensor.name.startswith("blk."):
            counts["decoder_layers"] += n
    counts["total"] = sum(v for k, v in counts.items() if k != "decoder_layers")

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    layers = int(value(f"{arch}.block_count"))

    def per_layer(key: str, default: Any = None) -> list[int]:
        found = value(f"{arch}.{key}")
        found = default if found is None else found
        return [int(v) for v in found] if isinstance(found, list) else [int(found)] * layers

    heads = per_layer("attention.head_count")
    info = {"architecture": f"GGUF {arch}", "family": value("layerprune.family"), "layers": layers,
            "hidden": int(value(f"{arch}.embedding_length")), "head_dim": value(f"{arch}.attention.key_length"),
            "heads": heads, "kv_heads": per_layer("attention.head_count_kv", heads),
            "intermediate": per_layer("feed_forward_length"), "vocab": len(value("tokenizer.ggml.tokens") or []),
            "tied_embeddings": counts["lm_head"] == 0}
    return counts, info


__all__ = ["INSTALL_HINT", "LlamaCppModel", "gguf_perplexity", "gguf_summary", "llama_cpp_available",
           "llama_cpp_module"]
