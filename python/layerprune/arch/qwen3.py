"""Qwen3: per-head ``q_norm`` / ``k_norm`` of shape ``[head_dim]``, shared by every head.

The norms act on each head's ``head_dim`` features, so removing heads leaves them whole; they are
counted in the budget and never sliced. ``attention_bias`` applies to all four projections.
"""

from layerprune.arch.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_type="qwen3",
    transformers_prefix="Qwen3",
    kept_settings=FamilyAdapter.kept_settings + ("attention_bias", "sliding_window", "use_sliding_window",
                                                 "max_window_layers", "layer_types"),
    qk_norm=True,
    description="Qwen3 (q/k norms)",
    gguf_architecture="qwen3",
    gguf_rope_adjacent_pairs=False,
    gguf_biases=(),
)
