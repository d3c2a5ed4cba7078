"""Scoring: element importance (fused Taylor / magnitude kernels, activation statistics), gradient hooks,
and the fold of element scores into KV groups and MLP channels.

Kernel dispatch lives in :mod:`layerprune.scoring.dispatch` (backends ``triton``, ``rust``, ``torch``),
gradient hooks in :mod:`layerprune.scoring.hooks`, the group folds in :mod:`layerprune.scoring.groups` and
the choice of what to keep in :mod:`layerprune.scoring.selection`.
"""

from layerprune.scoring.dispatch import (
    BACKENDS,
    SCORE_KINDS,
    ActivationStats,
    available_backends,
    flap_channel_scores,
    wanda_channel_scores,
    weight_scores,
)
from layerprune.scoring.hooks import GradientScorer

__all__ = [
    "BACKENDS",
    "SCORE_KINDS",
    "ActivationStats",
    "GradientScorer",
    "available_backends",
    "flap_channel_scores",
    "wanda_channel_scores",
    "weight_scores",
]
