"""``tp.importance`` for scripts that import ``layerprune.torch_pruning as tp``.

Torch-Pruning's importances under their own names (the same classes), and layerprune's kernel-backed ones,
which give the same scores as Torch-Pruning's Taylor and magnitude importances
(:mod:`layerprune.torch_pruning.kernel_importance`).
"""

from torch_pruning.pruner.importance import (
    BNScaleImportance,
    GroupHessianImportance,
    GroupMagnitudeImportance,
    GroupTaylorImportance,
    HessianImportance,
    Importance,
    LAMPImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
)
from torch_pruning.pruner.importance import ActivationImportance as ActivationImportance

from layerprune.torch_pruning.kernel_importance import (
    ActivationStatsImportance,
    KernelMagnitudeImportance,
    KernelTaylorImportance,
)

__all__ = [
    "ActivationImportance",
    "ActivationStatsImportance",
    "BNScaleImportance",
    "GroupHessianImportance",
    "GroupMagnitudeImportance",
    "GroupTaylorImportance",
    "HessianImportance",
    "Importance",
    "KernelMagnitudeImportance",
    "KernelTaylorImportance",
    "LAMPImportance",
    "MagnitudeImportance",
    "RandomImportance",
    "TaylorImportance",
]
