"""Mistral: the Llama layout with a sliding attention window (kept on save)."""

from layerprune.arch.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="mistral",
    architectures=("MistralForCausalLM",),
    model_type="mistral",
    transformers_prefix="Mistral",
    kept_settings=FamilyAdapter.kept_settings + ("sliding_window",),
    qkv_bias=False,
    o_bias=False,
    description="Mistral (sliding window kept)",
)
