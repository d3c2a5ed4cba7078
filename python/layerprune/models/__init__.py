"""Models: finding and loading them (dense, embedded, or pruned by layerprune) and counting their parameters."""

from layerprune.arch import check_supported, decoder_layers, supported_architectures
from layerprune.models.counting import count_parameters, model_info
from layerprune.models.embedded import (
    EMBEDDED_MODEL,
    SHIPPED_MODELS,
    cache_dir,
    embedded_gguf_path,
    embedded_model_dir,
    ensure_embedded_model,
    ensure_shipped_model,
)
from layerprune.models.loading import load_config, load_model, read_gguf, resolve_model
from layerprune.models.pruned import FORMAT_VERSION, is_pruned_folder, load_pruned, pruned_config, read_config_json

__all__ = [
    "EMBEDDED_MODEL",
    "FORMAT_VERSION",
    "SHIPPED_MODELS",
    "cache_dir",
    "check_supported",
    "count_parameters",
    "decoder_layers",
    "embedded_gguf_path",
    "embedded_model_dir",
    "ensure_embedded_model",
    "ensure_shipped_model",
    "is_pruned_folder",
    "load_config",
    "load_model",
    "load_pruned",
    "model_info",
    "pruned_config",
    "read_config_json",
    "read_gguf",
    "resolve_model",
    "supported_architectures",
]
