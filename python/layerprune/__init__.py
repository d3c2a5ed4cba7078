"""layerprune: structured pruning of Llama-family language models, uniform or unbalanced.

Data flows one way: model + calibration text -> scores -> layer importance -> allocation
-> pruned model -> evaluation -> report.
"""

from __future__ import annotations

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

__all__ = [
    "DataError",
    "InfeasibleError",
    "InternalError",
    "InvalidInputError",
    "LayerpruneError",
    "ModelError",
    "NumericalError",
    "__version__",
]
