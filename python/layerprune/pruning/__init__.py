"""Pruning: the config (its defaults are the best measured method), the two executors (the whole model in memory:
``prune``; layer by layer from a checkpoint on disk: ``layerprune.export.prune_checkpoint``, which writes as it
goes) and the tensor surgery (whole KV groups and MLP channels, through Torch-Pruning)."""

from layerprune.pruning.config import DEFAULT_METHOD, MODES, SOLVERS, PruneConfig, resolve_config
from layerprune.pruning.pipeline import PruneResult, prune
from layerprune.pruning.surgery import StructuredPruner, masked_dense_forward, pruned_copy

__all__ = ["DEFAULT_METHOD", "MODES", "SOLVERS", "PruneConfig", "PruneResult", "StructuredPruner",
           "masked_dense_forward", "prune", "pruned_copy", "resolve_config"]
