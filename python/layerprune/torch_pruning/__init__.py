"""A drop-in for the Torch-Pruning calls LLM-Pruner-style scripts make: ``import layerprune.torch_pruning as tp``.

``tp.pruner.MetaPruner`` takes Torch-Pruning's (and LLM-Pruner's fork's) arguments and ``step()`` semantics,
scores Torch-Pruning-shaped groups built per root without tracing the model, with any
``tp.importance.Importance``, and removes whole KV groups and MLP channels through layerprune's surgery
(:mod:`layerprune.torch_pruning.pruner`). ``layerprune.allocation.to_pruning_ratio_dict`` writes the rate
dictionary that reproduces one of layerprune's allocations.
"""

from torch_pruning.pruner.function import BasePruningFunc, prune_linear_in_channels, prune_linear_out_channels

from layerprune.torch_pruning import importance, pruner
from layerprune.torch_pruning.groups import GroupBuilder, StructureGroup
from layerprune.torch_pruning.pruner import BasePruner, MetaPruner, RMSNormPruner

__all__ = [
    "BasePruner",
    "BasePruningFunc",
    "GroupBuilder",
    "MetaPruner",
    "RMSNormPruner",
    "StructureGroup",
    "importance",
    "prune_linear_in_channels",
    "prune_linear_out_channels",
    "pruner",
]
