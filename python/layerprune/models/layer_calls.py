"""Running a decoder one layer at a time: the hidden state entering every decoder layer, the keyword arguments
(causal or sliding-window mask, position embeddings) the model passes each layer, one layer called again on
its captured input, and the loss from the hidden state entering the final norm.

Layer importance, the refit and the layer-by-layer executor all run layers this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Iterator
from typing import Any

import torch

from layerprune import distributed
from layerprune.arch import LAYER_KWARGS, adapter_for
from layerprune.errors import InvalidInputError, ModelError, NumericalError


@dataclass
class LayerInputs:
    """Hidden states entering every decoder layer (``hidden[L]`` enters the final norm)."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]
    labels: torch.Tensor
    base_loss: float


def check_ids(calib_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype not in (torch.long, torch.int):
        raise InvalidInputError("calib_ids: expected a 2-D integer tensor [n_samples, seq_len]")
    if calib_ids.shape[1] < 2 or calib_ids.shape[0] < 1:
        raise InvalidInputError(f"calib_ids: need at least 1 sample of >= 2 tokens, got shape {tuple(calib_ids.shape)}")
    return calib_ids.long()



def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device



def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype



def layer_call(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out



LOGITS_BYTES = 64 * 2**20  # float32 logits a loss holds at a time: [positions, vocabulary] in chunks of positions

HeadBlocks = Callable[[], Iterator[tuple[int, torch.Tensor]]]


def head_loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
              head_blocks: HeadBlocks | None = None, logits_bytes: int | None = None) -> float:
    """Mean next-token cross-entropy from the hidden state entering the final norm.

    ``loss = mean_{b,t<T-1} CE(F(lm_head(norm(h)))[b,t], labels[b,t+1])`` (``F``: the adapter's ``final_logits``; what HF's ``labels=input_ids``
    computes), over chunks of positions whose float32 logits take at most ``logits_bytes`` (default
    ``LOGITS_BYTES``: a 128k vocabulary holds 130 positions at a time, not the whole batch). Data-parallel: the sum and the token count of every
    rank's samples (:mod:`layerprune.distributed`). ``head_blocks``: the head matrix in row blocks, ``(first
    vocabulary row, rows)`` (the layer-by-layer engine's, which never holds it whole); each block is read once
    and the loss is a streaming log-sum-exp over the blocks (Milakov and Gimelshein 2018, "Online normalizer
    calculation for softmax"), equal to the whole head's to float rounding.
    """
    adapter = adapter_for(model)
    norm = adapter.final_norm(model)

    def final(z: torch.Tensor) -> torch.Tensor:  # the family's logits from the head's output (element-wise)
        return adapter.final_logits(model.config, z)

    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1).to(states.device)
    count = target.numel()
    budget = LOGITS_BYTES if logits_bytes is None else logits_bytes
    if head_blocks is not None:
        total = _streamed_cross_entropy(norm(states), target, head_blocks, budget, final)
    else:
        head = adapter.lm_head(model)
        rows = max(1, budget // (4 * head.weight.shape[0]))
        total = 0.0
        for s in range(0, count, rows):
            logits = final(head(norm(states[s:s + rows])).float())
            total += float(torch.nn.functional.cross_entropy(logits, target[s:s + rows], reduction="sum"))
    total, count = distributed.sum_values(total, count)
    return total / count


def _streamed_cross_entropy(normed: torch.Tensor, target: torch.Tensor, head_blocks: HeadBlocks,
                            logits_bytes: int, final: Any = None) -> float:
    """``Σ_i logsumexp(z_i) − z_i[target_i]`` with ``z = F(normed Wᵀ)`` (``F``: element-wise, the family's final
    logits) and ``W`` arriving in row blocks: a running
    maximum ``m`` and ``s = Σ exp(z − m)`` per position, rescaled when ``m`` grows."""
    n = normed.shape[0]
    peak = torch.full((n,), -math.inf, dtype=torch.float32, device=normed.device)
    scaled = torch.zeros(n, dtype=torch.float32, device=normed.device)
    picked = torch.zeros(n, dtype=torch.float32, device=normed.device)
    for first, weight in head_blocks():
        last = first + weight.shape[0]
        rows = max(1, logits_bytes // (4 * weight.shape[0]))
        for p in range(0, n, rows):
            q = min(p + rows, n)
            z = torch.nn.functional.linear(normed[p:q], weight).float()
            z = z if final is None else final(z)
            grown = torch.maximum(peak[p:q], z.amax(1))
            scaled[p:q] = scaled[p:q] * torch.exp(peak[p:q] - grown) + torch.exp(z - grown[:, None]).sum(1)
            peak[p:q] = grown
            t = target[p:q]
            inside = torch.nonzero((t >= first) & (t < last)).flatten()
            picked[p + inside] = z[inside, t[inside] - first]
    return float((peak + torch.log(scaled) - picked).double().sum())


def capture_layer_inputs(model: torch.nn.Module, calib_ids: torch.Tensor, progress: bool = True) -> LayerInputs:
    """One forward pass that records the hidden state entering each decoder layer and the final
    norm, and the keyword arguments (mask, position embeddings) each layer was called with."""
    calib_ids = check_ids(calib_ids)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    num = len(layers)
    hidden: list[torch.Tensor | None] = [None] * (num + 1)
    kwargs_seen: list[dict[str, Any]] = [{} for _ in range(num)]
    handles = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            hidden[index] = x.detach()
            kwargs_seen[index] = {k: v for k, v in kwargs.items() if k in LAYER_KWARGS}

        return hook

    def final_hook(module, args):
        hidden[num] = args[0].detach()

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        handles.append(adapter.final_norm(model).register_forward_pre_hook(final_hook))
        with torch.no_grad():
            adapter.inner_model(model)(input_ids=calib_ids.to(model_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(h is None for h in hidden):
        raise ModelError("model: the forward pass did not go through every decoder layer")
    labels = calib_ids.to(model_device(model))
    with torch.no_grad():
        base = head_loss(model, hidden[num], labels)  # type: ignore[arg-type]
    if not math.isfinite(base):
        raise NumericalError(f"calibration loss of the dense model is {base} (overflow in {_dtype(model)}?)")
    return LayerInputs(hidden=hidden, layer_kwargs=kwargs_seen, labels=labels, base_loss=base)  # type: ignore[arg-type]



class _Probed(Exception):
    """Ends a probing forward once the last decoder layer's arguments are captured."""



def layer_arguments(model: torch.nn.Module, *, input_ids: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The hidden state entering decoder layer 0 and the keyword arguments (mask, position embeddings) the model
    passes every layer, from the model's own forward with the layers' bodies replaced by a probe: no layer runs,
    so this costs the embedding lookup only."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    seen: list[dict[str, Any] | None] = [None] * len(layers)
    first: list[torch.Tensor] = []

    def probe(index: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                first.append(hidden.detach())
            seen[index] = {k: v for k, v in kwargs.items() if k in LAYER_KWARGS}
            if index == len(layers) - 1:
                raise _Probed
            return hidden

        return forward

    for i, layer in enumerate(layers):
        layer.forward = probe(i)
    try:
        with torch.no_grad():
            adapter.inner_model(model)(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False)
    except _Probed:
        pass
    finally:
        for layer in layers:
            del layer.forward
    if not first or any(s is None for s in seen):
        raise ModelError("model: the forward pass did not go through every decoder layer")
    return first[0], seen  # type: ignore[return-value]



def batch_slice(value: Any, start: int, end: int, batch: int) -> Any:
    """Samples ``start:end`` of a layer argument: tensors (and tuples of them) whose first dimension is the
    calibration batch ``batch`` are sliced; broadcast ones (position embeddings of batch 1, masks) are not."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch and batch > 1:
        return value[start:end]
    if isinstance(value, tuple):
        return tuple(batch_slice(v, start, end, batch) for v in value)
    return value


__all__ = ["LOGITS_BYTES", "HeadBlocks", "LayerInputs", "batch_slice", "capture_layer_inputs", "check_ids", "head_loss", "layer_arguments",
           "layer_call", "model_device"]
