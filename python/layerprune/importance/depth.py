"""SlimGPT's incremental pruning ratio as cost curves: pruning rates that rise logarithmically with depth.

SlimGPT (Ling et al., NeurIPS 2024) prunes shallow layers less than deep ones, with layer rates growing like the
logarithm of the depth, since a layer-wise refit's errors accumulate through the layers above it. As curves for
the exact ``dp`` allocation: a component of layer ``l`` with ``P`` prunable parameters that keeps the fraction
``k`` costs ``P (1 − k)² / w_l`` with ``w_l = ln(l + 2)``. Minimising ``Σ cost`` at a fixed number of removed
parameters gives every component the rate ``r_l ∝ w_l`` (the Lagrange condition ``2 r_l / w_l = μ``), whatever
the budget, so the same curves serve every ratio; ``dp`` then realises the schedule in whole KV groups and MLP
steps. No calibration data is read.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from layerprune.arch import adapter_for
from layerprune.arch.budget import mlp_grid_size
from layerprune.importance.result import LayerImportance


def depth_weight(layer: int) -> float:
    """``w_l = ln(l + 2)``: the relative pruning rate of layer ``l`` (0-based)."""
    return math.log(layer + 2)


def depth_importance(model: torch.nn.Module, *, mlp_step: int = 1) -> LayerImportance:
    """Curves ``P (1 − k)² / w_l`` on the allocation grid (attention g = 0..Hkv, MLP 0, mlp_step, ..., I)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    hidden = int(model.config.hidden_size)
    attn_curves, mlp_curves = [], []
    for l, layer in enumerate(layers):
        geo = adapter.geometry(model, layer)
        w = depth_weight(l)
        attn_params = hidden * geo.head_dim * (2 * geo.num_q_heads + 2 * geo.num_kv_heads)
        kept = np.arange(geo.num_kv_heads + 1) / geo.num_kv_heads
        attn_curves.append(attn_params * (1.0 - kept) ** 2 / w)
        grid = np.minimum(np.arange(mlp_grid_size(geo.intermediate, mlp_step)) * mlp_step, geo.intermediate)
        mlp_curves.append(3 * hidden * geo.intermediate * (1.0 - grid / geo.intermediate) ** 2 / w)
    weights = np.array([depth_weight(l) for l in range(len(layers))])
    return LayerImportance(method="depth", attn=1.0 / weights, mlp=1.0 / weights, combined=2.0 / weights,
                           attn_curves=attn_curves, mlp_curves=mlp_curves, mlp_step=mlp_step, metric="loss",
                           details={"schedule": "rates proportional to ln(l + 2) (SlimGPT's incremental ratio)"})


__all__ = ["depth_importance", "depth_weight"]
