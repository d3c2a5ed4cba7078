"""Layer removal: the calibration-loss increase when a layer, its attention or its MLP is the identity.

``combined[l]``: layer ``l`` replaced by the identity; ``attn[l]`` / ``mlp[l]``: only that sub-block's
residual branch skipped. The loss is the mean next-token cross-entropy, or the perplexity with
``metric="ppl"``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from layerprune import distributed
from layerprune.arch import adapter_for
from layerprune.errors import InvalidInputError
from layerprune.importance.losses import METRICS, increase, loss_from_layer
from layerprune.models.layer_calls import LayerInputs, capture_layer_inputs
from layerprune.importance.result import LayerImportance


def removal_importance(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    *,
    metric: str = "loss",
    sub_blocks: bool = True,
    progress: bool = True,
    cache: LayerInputs | None = None,
) -> LayerImportance:
    """Loss (or perplexity) increase when layer ``l`` / its attention / its MLP is the identity.

    Cost: one cached forward + for every layer ``l`` (1 or 3 variants) x (layers l..L-1 + head).
    """
    if metric not in METRICS:
        raise InvalidInputError(f"metric: expected one of {METRICS}, got {metric!r}")
    start = time.perf_counter()
    cache = cache or capture_layer_inputs(model, calib_ids, progress)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    num = len(layers)
    combined, attn, mlp = np.zeros(num), np.zeros(num), np.zeros(num)
    with torch.no_grad():
        for l in tqdm(range(num), desc="layer removal", disable=not progress, leave=False):
            x = cache.hidden[l]
            combined[l] = increase(loss_from_layer(model, cache, l + 1, x), cache.base_loss, metric)
            if sub_blocks:
                kw = cache.layer_kwargs[l]
                no_attn = adapter.layer_forward(layers[l], x, kw, skip_attn=True)
                attn[l] = increase(loss_from_layer(model, cache, l + 1, no_attn), cache.base_loss, metric)
                no_mlp = adapter.layer_forward(layers[l], x, kw, skip_mlp=True)
                mlp[l] = increase(loss_from_layer(model, cache, l + 1, no_mlp), cache.base_loss, metric)
    if not sub_blocks:
        attn, mlp = combined.copy(), combined.copy()
    return LayerImportance(
        method="removal",
        attn=attn,
        mlp=mlp,
        combined=combined,
        metric=metric,
        base_loss=cache.base_loss,
        seconds=time.perf_counter() - start,
        details={"calib_tokens": distributed.global_count(cache.labels.numel()), "sub_blocks": sub_blocks},
    )


__all__ = ["removal_importance"]
