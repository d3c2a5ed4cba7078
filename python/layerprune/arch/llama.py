"""Llama 2 (MHA), Llama 3 / 3.1 / 3.2 (GQA, ``llama3`` rope scaling) and SmolLM2.

``attention_bias`` puts a bias on all four attention projections, ``mlp_bias`` on all three MLP ones.
"""

from layerprune.arch.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="llama",
    architectures=("LlamaForCausalLM",),
    model_type="llama",
    transformers_prefix="Llama",
    kept_settings=FamilyAdapter.kept_settings + ("attention_bias", "mlp_bias", "pretraining_tp"),
    description="Llama 2/3/3.1/3.2, SmolLM2",
)
