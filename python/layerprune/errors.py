"""The exception tree of layerprune, declared once.

The Rust extension raises these same classes (it looks them up here by name), and the CLI
turns any of them into one error line and a non-zero exit.
"""

from __future__ import annotations


class LayerpruneError(Exception):
    """Base class of every error layerprune raises on purpose."""


class InvalidInputError(LayerpruneError, ValueError):
    """Bad input: a field out of range, mismatched lengths, NaN, an unknown name."""


class InfeasibleError(InvalidInputError):
    """The requested budget cannot be met under the constraints (the message names the binding one)."""


class ModelError(InvalidInputError):
    """A model that cannot be found, loaded, or is not Llama-like."""


class DataError(InvalidInputError):
    """A dataset that cannot be found or is too short for the request."""


class NumericalError(LayerpruneError, RuntimeError):
    """NaN or infinite values where finite ones are needed (for example float16 gradient overflow)."""


class InternalError(LayerpruneError, RuntimeError):
    """A bug in layerprune (including a caught Rust panic). Please report it."""


__all__ = [
    "LayerpruneError",
    "InvalidInputError",
    "InfeasibleError",
    "ModelError",
    "DataError",
    "NumericalError",
    "InternalError",
]
