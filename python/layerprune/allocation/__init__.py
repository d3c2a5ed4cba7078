"""Allocation: per-layer KV groups and MLP channels under an exact parameter budget (Rust solvers).

:mod:`~layerprune.allocation.solve` defines the problem and calls the solvers; :mod:`~layerprune.allocation.specs`
builds problems from a model's config or a JSON file;
:mod:`~layerprune.allocation.ratio_dict` turns a plan into a Torch-Pruning rate dictionary and back.
"""

from layerprune.allocation.solve import (
    DP_METHODS,
    SOLVERS,
    UNBALANCED_SOLVERS,
    AllocationResult,
    AllocationSpec,
    LayerAllocation,
    LayerShape,
    allocate,
    target_count,
)
from layerprune.allocation.ratio_dict import from_pruning_ratio_dict, to_pruning_ratio_dict
from layerprune.allocation.specs import load_spec, spec_from_json, spec_from_model_config, spec_to_json

__all__ = [
    "DP_METHODS",
    "SOLVERS",
    "UNBALANCED_SOLVERS",
    "AllocationResult",
    "AllocationSpec",
    "LayerAllocation",
    "LayerShape",
    "allocate",
    "from_pruning_ratio_dict",
    "load_spec",
    "spec_from_json",
    "spec_from_model_config",
    "target_count",
    "spec_to_json",
    "to_pruning_ratio_dict",
]
