"""Granite 3.x (``GraniteForCausalLM``): the Llama layout with four scales.

``h₀ = embedding_multiplier · embed(ids)``; each branch is added as ``x + residual_multiplier · f(x)``; attention
scores are ``attention_multiplier · q·k`` (not ``1/√d``); ``logits = lm_head(norm(h)) / logits_scaling``. The
attention scale lives inside transformers' attention module and the embedding scale in its model's forward, so
the adapter writes out the residual scale in its blocks and the logits divisor. llama.cpp's ``granite``
architecture reads all four as keys; ``deci`` (per-layer widths) gets them folded into the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from layerprune.arch.base import FamilyAdapter, config_value, head_dim


@dataclass(frozen=True)
class GraniteAdapter(FamilyAdapter):
    """Llama's adapter with Granite's scales (module docstring)."""

    def _scale(self, config: Any, key: str) -> float:
        default = 1.0 / math.sqrt(head_dim(config)) if key == "attention_multiplier" else 1.0
        return float(config_value(config, key, default))

    def attention_block(self, layer: Any, hidden: Any, kwargs: Mapping[str, Any]) -> Any:
        return super().attention_block(layer, hidden, kwargs) * layer.residual_multiplier

    def mlp_block(self, layer: Any, hidden: Any) -> Any:
        return super().mlp_block(layer, hidden) * layer.residual_multiplier

    def branch_output(self, layer: Any, projection: str, out: Any) -> Any:
        return out * layer.residual_multiplier

    def logits_divisor(self, config: Any) -> float:
        return self._scale(config, "logits_scaling")

    def gguf_metadata(self, config: Any) -> dict[str, Any]:
        return {"embedding_scale": self._scale(config, "embedding_multiplier"),
                "residual_scale": self._scale(config, "residual_multiplier"),
                "attention.scale": self._scale(config, "attention_multiplier"),
                "logit_scale": self._scale(config, "logits_scaling")}

    def gguf_folded_scales(self, config: Any, architecture: str) -> dict[str, float]:
        if architecture == self.gguf_architecture:  # read as keys
            return {}
        return {"embed": self._scale(config, "embedding_multiplier"),
                "output": 1.0 / self._scale(config, "logits_scaling"),
                "query": self._scale(config, "attention_multiplier") * math.sqrt(head_dim(config)),
                "residual": self._scale(config, "residual_multiplier")}


ADAPTER = GraniteAdapter(
    name="granite",
    architectures=("GraniteForCausalLM",),
    model_type="granite",
    transformers_prefix="Granite",
    kept_settings=FamilyAdapter.kept_settings + ("attention_bias", "mlp_bias", "embedding_multiplier",
                                                 "residual_multiplier", "attention_multiplier", "logits_scaling"),
    description="Granite 3.x (embedding, residual, attention and logit scales)",
    gguf_architecture="granite",
)
