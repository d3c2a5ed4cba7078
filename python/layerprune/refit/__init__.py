"""Refit: calibration Gram matrices of the output projections' inputs, and the least-squares refit of the
weights a layer keeps (SlimGPT / Týr's OBS update, FLAP's bias compensation). Pure tensor maths; the layer
loop that applies it to a model is :mod:`layerprune.pruning.refit_loop`."""

from layerprune.refit.grams import output_projection_grams
from layerprune.refit.lstsq import (
    DEFAULT_DAMPING,
    InputGram,
    compensation_bias,
    reconstruction_error,
    refit_output_projection,
)

# How a run refits the kept o_proj / down_proj columns; the bias modes add a compensation bias (FLAP).
REFIT_MODES = ("none", "lstsq", "lstsq-bias", "bias")
BIAS_MODES = ("lstsq-bias", "bias")

__all__ = ["BIAS_MODES", "DEFAULT_DAMPING", "REFIT_MODES", "InputGram", "compensation_bias", "output_projection_grams", "reconstruction_error",
           "refit_output_projection"]
