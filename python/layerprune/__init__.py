"""layerprune: structured pruning of Llama-family language models (Llama, Mistral, Qwen2, Qwen3, Granite), uniform or unbalanced.

Data flows one way: model + calibration text -> scores -> layer importance -> allocation
-> pruned model -> evaluation -> report. The public entry points below are imported lazily,
so `import layerprune` stays cheap and works without triton or CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

from layerprune.errors import (
    DataError,
    InfeasibleError,
    InternalError,
    InvalidInputError,
    LayerpruneError,
    ModelError,
    NumericalError,
)

__version__ = "0.1.0"

_LAZY = {
    "allocate": "layerprune.allocation",
    "AllocationSpec": "layerprune.allocation",
    "AllocationResult": "layerprune.allocation",
    "LayerAllocation": "layerprune.allocation",
    "LayerShape": "layerprune.allocation",
    "spec_from_model_config": "layerprune.allocation",
    "adapter_for": "layerprune.arch",
    "supported_architectures": "layerprune.arch",
    "weight_scores": "layerprune.scoring",
    "GradientScorer": "layerprune.scoring",
    "ActivationStats": "layerprune.scoring",
    "load_model": "layerprune.models",
    "perplexity": "layerprune.evaluation",
    "layer_importance": "layerprune.importance",
    "prune": "layerprune.pruning",
    "PruneConfig": "layerprune.pruning",
    "PruneResult": "layerprune.pruning",
    "resolve_config": "layerprune.pruning",
    "pruned_copy": "layerprune.pruning",
    "load_pruned": "layerprune.models",
    "save_pruned": "layerprune.export",
    "prune_checkpoint": "layerprune.export",
    "export_gguf": "layerprune.export",
    "heal": "layerprune.healing",
    "HealConfig": "layerprune.healing",
    "HealResult": "layerprune.healing",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'layerprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DataError",
    "InfeasibleError",
    "InternalError",
    "InvalidInputError",
    "LayerpruneError",
    "ModelError",
    "NumericalError",
    "__version__",
    *_LAZY,
]
