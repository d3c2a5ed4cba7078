"""Gemma 2 (``Gemma2ForCausalLM``): the Llama layout with four norms a layer and soft caps.

A layer is ``h = x + N₂(Attn(N₁ x))``, ``y = h + N₄(MLP(N₃ h))``: norms before and after each branch
(``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``),
each an RMSNorm scaling by ``1 + w``. The embedding is scaled by √hidden inside transformers' embedding module
(:meth:`~layerprune.arch.base.FamilyAdapter.scale_embeddings`); the head's logits are soft-capped,
``c · tanh(z / c)`` with ``c = final_logit_softcapping``. ``head_dim``, ``query_pre_attn_scalar``, the attention
soft cap and the alternating sliding-window / global layers (``layer_types``) live inside the attention and are
kept on save. The budget counts four norms of ``hidden`` a layer. GGUF: llama.cpp's ``gemma2`` for equal widths
(its norms get the 1 added, the sliding-window pattern and soft caps are keys); unequal widths are refused, as
``deci`` has no post-branch norms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from layerprune.arch.base import LAYER_KWARGS, FamilyAdapter, config_value, head_dim
from layerprune.arch.budget import LayerShape
from layerprune.errors import ModelError


@dataclass(frozen=True)
class Gemma2Adapter(FamilyAdapter):
    """Llama's adapter with Gemma 2's norms around each branch and its final soft cap (module docstring)."""

    # llama.cpp's gemma2 / gemma3: NEOX rope, no biases read, norms + 1, no per-layer widths, its own sliding window
    gguf_rope_adjacent_pairs: bool = False
    gguf_biases: tuple[str, ...] = ()
    gguf_norm_offset: float = 1.0
    gguf_per_layer: bool = False
    gguf_sliding_window: bool = True
    window_bos: bool = True

    def layer_shape(self, config: Any, output_bias: bool = False) -> LayerShape:
        shape = super().layer_shape(config, output_bias)
        return dataclasses.replace(shape, norm_params=shape.norm_params + 2 * shape.hidden)

    def _check_layer(self, layer: Any, index: int) -> None:
        super()._check_layer(layer, index)
        for sub in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            if not hasattr(layer, sub):
                raise ModelError(f"model.layers[{index}] ({type(layer).__name__}) has no `{sub}`: not a {self.name} layer")

    def attention_block(self, layer: Any, hidden: Any, kwargs: Mapping[str, Any]) -> Any:
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **{k: kwargs.get(k) for k in LAYER_KWARGS})
        return layer.post_attention_layernorm(out[0] if isinstance(out, tuple) else out)

    def mlp_block(self, layer: Any, hidden: Any) -> Any:
        return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))

    def branch_output(self, layer: Any, projection: str, out: Any) -> Any:
        norm = layer.post_attention_layernorm if projection == "o_proj" else layer.post_feedforward_layernorm
        return norm(out)

    def logit_softcap(self, config: Any) -> float | None:
        cap = config_value(config, "final_logit_softcapping")
        return None if cap is None else float(cap)

    # ---- GGUF (llama.cpp's gemma2) ----

    def gguf_metadata(self, config: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, field in (("attn_logit_softcapping", "attn_logit_softcapping"),
                           ("final_logit_softcapping", "final_logit_softcapping")):
            value = config_value(config, field)
            if value is not None:
                out[key] = float(value)
        window = config_value(config, "sliding_window")
        if window is not None:
            out["attention.sliding_window"] = int(window)
        types = config_value(config, "layer_types")
        if types is not None:
            out["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in types]
        return out

    def gguf_folded_scales(self, config: Any, architecture: str) -> dict[str, float]:
        # llama.cpp scales queries by 1/√head_dim (1/√(hidden/heads) for 46 layers, the 27B), transformers by
        # query_pre_attn_scalar^-½: the ratio goes into the Q rows
        layers, hidden, heads = (int(config_value(config, k)) for k in ("num_hidden_layers", "hidden_size",
                                                                          "num_attention_heads"))
        theirs = hidden / heads if layers == self._llama_cpp_27b_layers() else head_dim(config)
        ours = float(config_value(config, "query_pre_attn_scalar", head_dim(config)))
        return {} if ours == theirs else {"query": math.sqrt(theirs / ours)}

    def _llama_cpp_27b_layers(self) -> int:
        """The layer count at which llama.cpp takes a model for the 27B and scales queries by 1/√(hidden/heads)."""
        return 46

    def gguf_layer_norms(self) -> tuple[tuple[str, str], ...]:
        return (("input_layernorm", "ATTN_NORM"), ("post_attention_layernorm", "ATTN_POST_NORM"),
                ("pre_feedforward_layernorm", "FFN_PRE_NORM"), ("post_feedforward_layernorm", "FFN_POST_NORM"))


ADAPTER = Gemma2Adapter(
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    model_type="gemma2",
    transformers_prefix="Gemma2",
    kept_settings=FamilyAdapter.kept_settings + ("attention_bias", "head_dim", "query_pre_attn_scalar",
                                                 "final_logit_softcapping", "attn_logit_softcapping",
                                                 "sliding_window", "layer_types", "hidden_activation"),
    description="Gemma 2 (four norms a layer, soft caps, scaled embeddings)",
    gguf_architecture="gemma2",
)
