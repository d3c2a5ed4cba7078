"""Pruning: the tensor surgery (whole KV groups and MLP channels, through Torch-Pruning) and the pipeline
that drives it (calibration -> scores -> layer importance -> allocation -> surgery)."""

from layerprune.pruning.pipeline import MODES, SOLVERS, PruneConfig, PruneResult, prune
from layerprune.pruning.surgery import StructuredPruner, masked_dense_forward, prune_model

__all__ = ["MODES", "SOLVERS", "PruneConfig", "PruneResult", "StructuredPruner", "masked_dense_forward", "prune",
           "prune_model"]
