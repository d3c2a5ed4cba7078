"""Losses from a perturbed layer on: one cached forward pass (:func:`layerprune.models.layer_calls.capture_layer_inputs`)
reused by every layer-importance method. Evaluating a change to layer ``l`` runs only layer ``l`` and layers
``l+1 .. L-1`` plus the final norm and ``lm_head`` on the cached input of layer ``l``.
"""

from __future__ import annotations

import math

import torch

from layerprune import distributed
from layerprune.arch import adapter_for
from layerprune.errors import NumericalError
from layerprune.models.layer_calls import LayerInputs, batch_slice, head_loss, layer_call

METRICS = ("loss", "ppl")


def loss_from_layer(model: torch.nn.Module, cache: LayerInputs, start: int, hidden: torch.Tensor) -> float:
    """Calibration loss when ``hidden`` enters layer ``start`` (runs layers start..L-1 + head)."""
    layers = adapter_for(model).decoder_layers(model)
    with torch.no_grad():
        for i in range(start, len(layers)):
            hidden = layer_call(layers[i], hidden, cache.layer_kwargs[i])
        loss = head_loss(model, hidden, cache.labels)
    if not math.isfinite(loss):
        raise NumericalError(f"calibration loss became {loss} after perturbing layer {start - 1}")
    return loss


def subset_cache(model: torch.nn.Module, cache: LayerInputs, n_samples: int) -> LayerInputs:
    """The first ``n_samples`` calibration sequences of a cache (per-sample tensors sliced on dim 0); of the
    whole batch when data-parallel (each rank keeps its samples among them)."""
    n_all = cache.labels.shape[0]
    if n_samples >= distributed.global_count(n_all):
        return cache
    distributed.check_shareable(n_samples, "curve_samples")
    n_local = distributed.local_prefix(n_samples, n_all)
    hidden = [h[:n_local] for h in cache.hidden]
    kwargs = [{k: batch_slice(v, 0, n_local, n_all) for k, v in kw.items()} for kw in cache.layer_kwargs]
    labels = cache.labels[:n_local]
    sub = LayerInputs(hidden=hidden, layer_kwargs=kwargs, labels=labels, base_loss=0.0)
    with torch.no_grad():
        sub.base_loss = head_loss(model, hidden[-1], labels)
    return sub


def increase(loss: float, base: float, metric: str) -> float:
    if metric == "ppl":
        return math.exp(min(loss, 700.0)) - math.exp(base)
    return loss - base


__all__ = ["METRICS", "increase", "loss_from_layer", "subset_cache"]
