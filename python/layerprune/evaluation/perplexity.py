"""Perplexity, forward throughput and greedy generation.

Perplexity follows LLM-Pruner's evaluator (``LLMPruner/evaluator/ppl.py``): the token stream is
cut into non-overlapping windows of `seq_len` tokens (a tail shorter than a window is dropped),
each window is scored on its own, and

    PPL = exp( (1 / P) * sum_w sum_{t=1}^{seq_len-1} -log p(x_{w,t} | x_{w,<t}) ),

with P = windows * (seq_len - 1) predicted tokens (the first token of a window is context only).
A family that needs BOS at the start of every sequence (Gemma: ``FamilyAdapter.window_bos``) gets it before each
window, as context only: the same P tokens are predicted, from one more token of context.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from layerprune.arch import window_prefix_token
from layerprune.errors import DataError, InvalidInputError, NumericalError

FAMILY = "family"  # prefix_token's default: the model family's choice (window_prefix_token)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_window_args(seq_len: int, batch_size: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise InvalidInputError(f"seq_len must be an integer of at least 2; got {seq_len!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be a positive integer; got {batch_size!r}")


def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 128,
    batch_size: int = 1,
    progress: bool = True,
    prefix_token: int | None | str = FAMILY,
) -> dict[str, Any]:
    """Perplexity of `model` on `tokens` (1-D or [1, N]) with non-overlapping windows.

    Returns ``{"ppl", "nll", "tokens", "predicted_tokens", "windows", "seq_len", "window_prefix"}`` where `nll` is
    the mean next-token negative log-likelihood in nats and `tokens` counts the tokens used.
    The loss is summed in float64 from float32 log-probabilities whatever the model dtype. ``prefix_token``: a
    token put before every window as context (default: the family's, :func:`~layerprune.arch.window_prefix_token`).
    """
    from tqdm.auto import tqdm

    _check_window_args(seq_len, batch_size)
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise InvalidInputError(f"tokens must be 1-D (or [1, N]); got shape {tuple(tokens.shape)}")
    windows = tokens.numel() // seq_len
    if windows == 0:
        raise DataError(f"{tokens.numel()} tokens do not fill one window of seq_len {seq_len}")
    used = windows * seq_len
    stream = tokens[:used].to(torch.long).view(windows, seq_len)
    prefix = window_prefix_token(model) if prefix_token == FAMILY else prefix_token
    skip = 0 if prefix is None else 1  # logits of the prefix position predict the window's first token: unscored
    device = _model_device(model)
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=windows, desc="perplexity", unit="window", disable=not progress, leave=False)
            for start in range(0, windows, batch_size):
                batch = stream[start : start + batch_size].to(device)
                inputs = batch if prefix is None else torch.cat(
                    [torch.full((batch.shape[0], 1), int(prefix), dtype=batch.dtype, device=device), batch], 1)
                logits = model(input_ids=inputs, use_cache=False).logits
                shift_logits = logits[:, skip:-1, :].float()
                labels = batch[:, 1:]
                nll = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]), labels.reshape(-1), reduction="sum"
                )
                total_nll += float(nll.double())
                bar.update(batch.shape[0])
            bar.close()
    finally:
        model.train(was_training)
    predicted = windows * (seq_len - 1)
    mean_nll = total_nll / predicted
    if not math.isfinite(mean_nll):
        raise NumericalError(f"mean negative log-likelihood is {mean_nll}: the model produced non-finite logits")
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": used,
        "predicted_tokens": predicted,
        "windows": windows,
        "seq_len": seq_len,
        "window_prefix": prefix,
    }


def _synchronizer(device: torch.device):
    """A call that waits for ``device``'s queued work: ``torch.cuda.synchronize(device)`` on CUDA (that device, not
    the current one), nothing on the CPU, whose work is done when the call returns."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def throughput(
    model: torch.nn.Module,
    seq_len: int = 128,
    batch_size: int = 1,
    repeats: int = 3,
    vocab: int | None = None,
) -> float:
    """Median forward-pass throughput in tokens per second (one warm-up pass, then `repeats` timed)."""
    _check_window_args(seq_len, batch_size)
    if repeats < 1:
        raise InvalidInputError(f"repeats must be positive; got {repeats}")
    config: Any = model.config
    vocab = int(vocab if vocab is not None else config.vocab_size)
    device = _model_device(model)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    synchronize = _synchronizer(device)
    timings = []
    with torch.inference_mode():
        model(input_ids=batch, use_cache=False)
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            synchronize()
            timings.append(time.perf_counter() - start)
    return batch_size * seq_len / statistics.median(timings)


def generate_greedy(
    model: torch.nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 32
) -> list[str]:
    """Greedy continuations (argmax at each step, no KV cache, stops at EOS); returns the new text only."""
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be positive; got {max_new_tokens}")
    device = _model_device(model)
    eos = tokenizer.eos_token_id
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                next_id = int(torch.argmax(logits))
                if eos is not None and next_id == eos:
                    break
                new.append(next_id)
                ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
            outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


__all__ = ["generate_greedy", "perplexity", "throughput"]
