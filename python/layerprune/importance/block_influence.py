"""Block Influence (ShortGPT, Men et al. 2024): ``BI = 1 - mean_t cos(x_t, y_t)``.

Between the hidden state entering and leaving a block, per token ``t``: for the whole layer, the
attention sub-block (``x -> x + Attn(LN1 x)``) and the MLP sub-block (``h -> h + MLP(LN2 h)``).
One forward pass, no loss.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from layerprune import distributed
from layerprune.arch import adapter_for
from layerprune.errors import NumericalError
from layerprune.models.layer_calls import LayerInputs, capture_layer_inputs
from layerprune.importance.result import LayerImportance


def block_influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - mean_t cos(x_t, y_t)`` over all tokens (ShortGPT's Block Influence); data-parallel: over every
    rank's tokens."""
    cos = torch.nn.functional.cosine_similarity(x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1]), dim=-1)
    if distributed.active() is None:
        return float(1.0 - cos.mean())
    total, count = distributed.sum_values(float(cos.double().sum()), cos.numel())
    return 1.0 - total / count


def activation_importance(
    model: torch.nn.Module, calib_ids: torch.Tensor, *, progress: bool = True, cache: LayerInputs | None = None
) -> LayerImportance:
    """Block Influence of every layer and sub-block from one forward pass (cached states)."""
    start = time.perf_counter()
    cache = cache or capture_layer_inputs(model, calib_ids, progress)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    num = len(layers)
    combined, attn, mlp = np.zeros(num), np.zeros(num), np.zeros(num)
    with torch.no_grad():
        for l in tqdm(range(num), desc="block influence", disable=not progress, leave=False):
            x = cache.hidden[l]
            mid = x + adapter.attention_block(layers[l], x, cache.layer_kwargs[l])
            attn[l] = block_influence(x, mid)
            mlp[l] = block_influence(mid, cache.hidden[l + 1])
            combined[l] = block_influence(x, cache.hidden[l + 1])
    for name, arr in (("attn", attn), ("mlp", mlp), ("combined", combined)):
        if not np.all(np.isfinite(arr)):
            raise NumericalError(f"block influence ({name}) is not finite")
    return LayerImportance(
        method="activation",
        attn=attn,
        mlp=mlp,
        combined=combined,
        metric="block_influence",
        base_loss=cache.base_loss,
        seconds=time.perf_counter() - start,
        details={"calib_tokens": distributed.global_count(cache.labels.numel())},
    )


__all__ = ["activation_importance", "block_influence"]
