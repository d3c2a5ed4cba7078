"""Gemma 3 text models (``Gemma3ForCausalLM``, config ``Gemma3TextConfig``): Gemma 2's layer plus per-head q/k norms.

As Gemma 2 (:mod:`layerprune.arch.gemma2`): four norms a layer scaling by ``1 + w``, the √hidden embedding scale,
``query_pre_attn_scalar``, local (sliding-window) and global layers in ``layer_types``, and an optional final soft
cap. Gemma 3 adds per-head ``q_norm`` / ``k_norm`` of shape ``[head_dim]`` (never sliced, as Qwen3's) and a rope
base of its own for each kind of layer (``rope_parameters["sliding_attention"]`` and ``["full_attention"]``); both
are kept on save. GGUF: llama.cpp's ``gemma3`` for equal widths, the global layers' rope as ``rope.freq_base``
(and its factors), the local layers' base as ``rope.freq_base_swa``; unequal widths are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from layerprune.arch.base import FamilyAdapter, config_value
from layerprune.arch.gemma2 import Gemma2Adapter
from layerprune.errors import ModelError


@dataclass(frozen=True)
class Gemma3Adapter(Gemma2Adapter):
    """Gemma 2's adapter with per-head q/k norms and a rope per kind of layer (module docstring)."""

    def rotary_embedding(self, model: Any) -> Any:
        """The global layers' rotary embedding (what llama.cpp's ``rope.freq_base`` and ``rope_freqs`` describe)."""
        rotary = getattr(self.inner_model(model), "rotary_emb", None)
        inv_freq = getattr(rotary, "full_attention_inv_freq", None)
        if inv_freq is None:
            raise ModelError(f"model: {type(model).__name__} has no global-attention rotary embedding "
                             "(model.rotary_emb.full_attention_inv_freq)")
        return SimpleNamespace(inv_freq=inv_freq,
                               attention_scaling=getattr(rotary, "full_attention_attention_scaling", 1.0))

    def gguf_metadata(self, config: Any) -> dict[str, Any]:
        out = super().gguf_metadata(config)
        if out.pop("attn_logit_softcapping", None) is not None:
            raise ModelError("model: its config sets attn_logit_softcapping, which llama.cpp's gemma3 does not apply")
        local = (config_value(config, "rope_parameters") or {}).get("sliding_attention") or {}
        if local.get("rope_theta") is not None:
            out["rope.freq_base_swa"] = float(local["rope_theta"])
        return out

    def _llama_cpp_27b_layers(self) -> int:
        return 62


ADAPTER = Gemma3Adapter(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    model_type="gemma3_text",
    transformers_prefix="Gemma3",
    kept_settings=FamilyAdapter.kept_settings + ("attention_bias", "head_dim", "query_pre_attn_scalar",
                                                 "final_logit_softcapping", "attn_logit_softcapping",
                                                 "sliding_window", "layer_types", "hidden_activation",
                                                 "use_bidirectional_attention"),
    qk_norm=True,
    description="Gemma 3 text (four norms a layer, q/k norms, a rope per kind of layer, scaled embeddings)",
    gguf_architecture="gemma3",
)
