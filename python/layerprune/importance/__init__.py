"""Layer importance: how much each decoder layer (and each of its two sub-blocks) matters.

Three methods, all measured on a calibration batch and all reusing ONE cached forward pass
(:func:`layerprune.models.layer_calls.capture_layer_inputs`; the losses in :mod:`layerprune.importance.losses`):

* ``removal`` (:mod:`~layerprune.importance.removal`): the calibration-loss (or perplexity) increase when
  a layer, its attention or its MLP is the identity;
* ``activation`` (:mod:`~layerprune.importance.block_influence`): Block Influence, ShortGPT;
* ``sensitivity`` (:mod:`~layerprune.importance.sensitivity`): per-layer cost curves of pruning one layer
  to each number of KV groups and MLP channels;
* ``reconstruction`` (:mod:`~layerprune.importance.reconstruction`): the same curves estimated without pruned
  evaluations, from the Fisher-weighted structured-OBS error after the refit (needs the refit batch);
* ``depth`` (:mod:`~layerprune.importance.depth`): no measurement, SlimGPT's rates rising as ln(depth).

The decoder block is the family adapter's (pre-norm residual, :class:`layerprune.arch.FamilyAdapter`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from layerprune.arch import adapter_for
from layerprune.errors import InvalidInputError
from layerprune.importance.block_influence import activation_importance
from layerprune.importance.losses import METRICS, loss_from_layer
from layerprune.models.layer_calls import LayerInputs, capture_layer_inputs, check_ids, head_loss
from layerprune.importance.depth import depth_importance
from layerprune.importance.reconstruction import reconstruction_importance
from layerprune.importance.removal import removal_importance
from layerprune.importance.result import LayerImportance
from layerprune.importance.sensitivity import DEFAULT_FRACTIONS, head_columns, sensitivity_importance
from layerprune.scoring.groups import element_group_scores

METHODS = ("removal", "activation", "sensitivity", "reconstruction", "depth")


def layer_importance(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    method: str = "removal",
    *,
    kv_group_scores: Sequence[torch.Tensor] | None = None,
    channel_scores: Sequence[torch.Tensor] | None = None,
    importance: str = "taylor",
    progress: bool = True,
    **options: Any,
) -> LayerImportance:
    """Dispatch to :func:`removal_importance`, :func:`activation_importance` or
    :func:`sensitivity_importance` (which computes element scores with ``importance`` when they
    are not given). The model is only read."""
    if method not in METHODS:
        raise InvalidInputError(f"layer_importance: expected one of {METHODS}, got {method!r}")
    calib_ids = check_ids(calib_ids)
    adapter_for(model).decoder_layers(model)
    if method == "removal":
        return removal_importance(model, calib_ids, progress=progress, **options)
    if method == "activation":
        return activation_importance(model, calib_ids, progress=progress, **options)
    if method == "depth":
        return depth_importance(model, **options)
    if method == "reconstruction":
        return reconstruction_importance(model, calib_ids, progress=progress, **options)
    if kv_group_scores is None or channel_scores is None:
        kv_group_scores, channel_scores = element_group_scores(model, calib_ids, importance=importance, progress=progress)
    return sensitivity_importance(model, calib_ids, kv_group_scores, channel_scores, progress=progress, **options)


__all__ = [
    "DEFAULT_FRACTIONS",
    "METHODS",
    "METRICS",
    "LayerImportance",
    "LayerInputs",
    "activation_importance",
    "capture_layer_inputs",
    "depth_importance",
    "head_columns",
    "head_loss",
    "layer_importance",
    "loss_from_layer",
    "reconstruction_importance",
    "removal_importance",
    "sensitivity_importance",
]
