"""Compare: dense, uniform and unbalanced pruning at equal size, evaluated on the same tokens, with a report.

:mod:`~layerprune.compare.settings` (methods, settings), :mod:`~layerprune.compare.matching` (requests that
land methods at equal size), :mod:`~layerprune.compare.store` (the run store), :mod:`~layerprune.compare.run`
(the comparison itself).
"""

from layerprune.compare.run import compare, measure_model
from layerprune.compare.settings import (
    DEFAULT_MAX_TOKENS,
    METHODS,
    CompareSettings,
    parse_methods,
    parse_ratios,
    prune_config,
    validate_settings,
)

__all__ = ["DEFAULT_MAX_TOKENS", "METHODS", "CompareSettings", "compare", "measure_model", "parse_methods",
           "parse_ratios", "prune_config", "validate_settings"]
