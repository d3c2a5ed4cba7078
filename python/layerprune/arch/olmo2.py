"""OLMo-2 (``Olmo2ForCausalLM``): post-norm blocks and q/k norms over the whole projections.

A layer is ``h = x + N₁(Attn(x))``, ``y = h + N₂(MLP(h))``: no norm before a branch, one after each
(``post_attention_layernorm``, ``post_feedforward_layernorm``). Inside the attention ``q_norm`` and ``k_norm`` are
RMSNorms over the whole q and k projections (``num_heads · head_dim`` and ``num_kv_heads · head_dim`` weights), not
per head: removing a KV group removes its heads' weights from both, and the pruned norms normalise over the kept heads
(the budget's ``group_norm``; ``masked_dense_forward`` recomputes them the same way). GGUF: llama.cpp's ``olmo2``
fixes q_proj at hidden × hidden, so only a model with all its heads and equal MLP widths is written; ``deci`` has no
post-branch or q/k norms, so others are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from layerprune.arch.base import ATTENTION_PROJECTIONS, LAYER_KWARGS, MLP_PROJECTIONS, FamilyAdapter
from layerprune.errors import ModelError


@dataclass(frozen=True)
class Olmo2Adapter(FamilyAdapter):
    """Llama's adapter with OLMo-2's post-branch norms and whole-projection q/k norms (module docstring)."""

    qk_norm_whole: bool = True
    gguf_rope_adjacent_pairs: bool = False
    gguf_full_width_attention: bool = True
    gguf_per_layer: bool = False
    gguf_biases: tuple[str, ...] = ()  # llama.cpp's olmo2 loader reads none

    def _check_layer(self, layer: Any, index: int) -> None:
        from torch import nn

        for sub in ("self_attn", "post_attention_layernorm", "mlp", "post_feedforward_layernorm"):
            if not hasattr(layer, sub):
                raise ModelError(f"model.layers[{index}] ({type(layer).__name__}) has no `{sub}`: not a {self.name} layer")
        for block, names in ((layer.self_attn, ATTENTION_PROJECTIONS + ("q_norm", "k_norm")), (layer.mlp, MLP_PROJECTIONS)):
            for n in names:
                if not isinstance(getattr(block, n, None), nn.Module):
                    raise ModelError(f"model.layers[{index}]: expected a `{n}` module (not a {self.name} layer)")

    def attention_block(self, layer: Any, hidden: Any, kwargs: Mapping[str, Any]) -> Any:
        out = layer.self_attn(hidden_states=hidden, **{k: kwargs.get(k) for k in LAYER_KWARGS})
        return layer.post_attention_layernorm(out[0] if isinstance(out, tuple) else out)

    def mlp_block(self, layer: Any, hidden: Any) -> Any:
        return layer.post_feedforward_layernorm(layer.mlp(hidden))

    def branch_output(self, layer: Any, projection: str, out: Any) -> Any:
        norm = layer.post_attention_layernorm if projection == "o_proj" else layer.post_feedforward_layernorm
        return norm(out)

    def gguf_layer_norms(self) -> tuple[tuple[str, str], ...]:
        return (("post_attention_layernorm", "ATTN_POST_NORM"), ("post_feedforward_layernorm", "FFN_POST_NORM"))


ADAPTER = Olmo2Adapter(
    name="olmo2",
    architectures=("Olmo2ForCausalLM",),
    model_type="olmo2",
    transformers_prefix="Olmo2",
    kept_settings=FamilyAdapter.kept_settings + ("attention_bias", "hidden_act"),
    description="OLMo-2 (post-branch norms, q/k norms over the whole projections)",
    gguf_architecture="olmo2",
)
