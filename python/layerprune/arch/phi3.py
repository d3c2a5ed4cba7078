"""Phi-3, Phi-3.5 and Phi-4-mini (``Phi3ForCausalLM``): the Llama layout with fused projections.

``qkv_proj`` stacks the q, k and v rows (``[q | k | v]``) and ``gate_up_proj`` the gate and up rows; both are split
into the separate projections when a model comes in (:func:`~layerprune.arch.modeling_layerprune.split_fused_projections`),
so a KV group's rows are cut from the three row ranges and an MLP channel from both halves. Phi-3's own attention
and MLP code then runs on their concatenated outputs, with each layer's own head counts. Phi-4-mini rotates only
``partial_rotary_factor`` of each head and ties its embeddings; Phi-3.5 and Phi-4-mini scale RoPE with LongRoPE
(``short_factor`` / ``long_factor``); Phi-3-mini-4k has a sliding window. All are kept on save.

Saved pruned models keep the split projections, with per-layer widths, even when every layer has the same widths
(``plain_save_obstacle``). GGUF: llama.cpp's ``llama`` (equal widths) or ``deci`` graphs, with split projections and
adjacent-pair RoPE; the export refuses LongRoPE (it changes the attention scale) and partial rotary, in one line each.
"""

from layerprune.arch.base import FamilyAdapter


ADAPTER = FamilyAdapter(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    model_type="phi3",
    transformers_prefix="Phi3",
    kept_settings=FamilyAdapter.kept_settings + ("sliding_window", "original_max_position_embeddings",
                                                 "partial_rotary_factor", "resid_pdrop", "embd_pdrop", "hidden_act"),
    description="Phi-3, Phi-3.5, Phi-4-mini (fused qkv and gate/up, LongRoPE, partial rotary)",
    plain_save_obstacle=("Phi-3's own class keeps q/k/v and gate/up fused and derives head_dim from hidden_size / "
                         "heads in its RoPE checks; layerprune keeps them split, with per-layer widths"),
)
