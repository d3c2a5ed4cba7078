"""Refit: calibration Gram matrices of the output projections' inputs, and the least-squares refit of the
weights a layer keeps (SlimGPT / Týr's OBS update, FLAP's bias compensation). Pure tensor maths; the layer
loop that applies it to a model is :mod:`layerprune.pruning.refit`."""

from layerprune.refit.grams import output_projection_grams
from layerprune.refit.lstsq import (
    DEFAULT_DAMPING,
    InputGram,
    compensation_bias,
    reconstruction_error,
    refit_output_projection,
)

__all__ = ["DEFAULT_DAMPING", "InputGram", "compensation_bias", "output_projection_grams", "reconstruction_error",
           "refit_output_projection"]
