"""Qwen2 and Qwen2.5: biases on q, k and v (pruned with their heads), none on o_proj or the MLP."""

from layerprune.arch.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    model_type="qwen2",
    transformers_prefix="Qwen2",
    kept_settings=FamilyAdapter.kept_settings + ("sliding_window", "use_sliding_window", "max_window_layers",
                                                 "layer_types"),
    qkv_bias=True,
    o_bias=False,
    description="Qwen2, Qwen2.5 (q/k/v biases)",
    gguf_architecture="qwen2",
    gguf_rope_adjacent_pairs=False,
    gguf_biases=("q_proj", "k_proj", "v_proj"),
    gguf_full_width_attention=True,
)
