"""Running a decoder one layer at a time: the hidden state entering every decoder layer, the keyword arguments
(causal or sliding-window mask, position embeddings) the model passes each layer, one layer called again on
its captured input, and the loss from the hidden state entering the final norm.

Layer importance, the refit and the layer-by-layer executor all run layers this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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



def head_loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4,
              lm_head: Any = None) -> float:
    """Mean next-token cross-entropy from the hidden state entering the final norm.

    ``loss = mean_{b,t<T-1} CE(lm_head(norm(h))[b,t], labels[b,t+1])`` (what HF's ``labels=input_ids``
    computes), evaluated ``chunk`` samples at a time to bound the logits' memory. Data-parallel: the sum and
    the token count of every rank's samples (:mod:`layerprune.distributed`). ``lm_head``: a callable that
    stands in for the model's (the layer-by-layer engine's, which reads the head matrix in row blocks).
    """
    adapter = adapter_for(model)
    norm, lm_head = adapter.final_norm(model), adapter.lm_head(model) if lm_head is None else lm_head
    total, count = 0.0, 0
    for s in range(0, hidden.shape[0], chunk):
        logits = lm_head(norm(hidden[s : s + chunk, :-1])).float()
        target = labels[s : s + chunk, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    total, count = distributed.sum_values(total, count)
    return total / count



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


__all__ = ["LayerInputs", "batch_slice", "capture_layer_inputs", "check_ids", "head_loss", "layer_arguments",
           "layer_call", "model_device"]
