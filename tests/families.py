"""Tiny random checkpoints of every supported family, built with each family's real config class.

Each case carries the setting peers lost on save (rope scaling, sliding window, biases, q/k norms)
so the family tests can check that it survives pruning, saving and reloading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from functools import lru_cache
from typing import Any

import torch

VOCAB = 320
REPO_ROOT = Path(__file__).resolve().parents[1]


def find_data_dir() -> Path | None:
    """The WikiText-2 raw folder: $LAYERPRUNE_TEST_DATA_DIR, $LAYERPRUNE_DATA_DIR, or ../shared/data/wikitext-2-raw."""
    for candidate in (
        os.environ.get("LAYERPRUNE_TEST_DATA_DIR"),
        os.environ.get("LAYERPRUNE_DATA_DIR"),
        str(REPO_ROOT.parent / "shared" / "data" / "wikitext-2-raw"),
    ):
        if candidate and (Path(candidate) / "test.txt").is_file():
            return Path(candidate)
    return None
SAMPLE_TEXT = " = Robert Boulter is an English film , television and theatre actor ."


@dataclass(frozen=True)
class FamilyCase:
    name: str
    config_class: str
    model_class: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    # config keys whose value must survive saving, with the value set here
    settings: dict[str, Any] = field(default_factory=dict)


_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=3, max_position_embeddings=256, rms_norm_eps=1e-5)

# Phi-4-mini's RoPE as its config.json writes it: LongRoPE factors (rope_scaling) over a partial rotary dimension
# (half of head_dim 8: 2 factors each); transformers keeps it as one normalised rope_parameters dict
_PHI_ROPE = {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 3.0]}
_PHI_ROPE_SAVED = {**_PHI_ROPE, "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                   "original_max_position_embeddings": 64}

CASES = (
    FamilyCase("llama3-gqa", "LlamaConfig", "LlamaForCausalLM",
               dict(hidden_size=48, intermediate_size=80, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                    tie_word_embeddings=True)),
    FamilyCase("llama2-mha", "LlamaConfig", "LlamaForCausalLM",
               dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                    tie_word_embeddings=False)),
    FamilyCase("llama31-rope", "LlamaConfig", "LlamaForCausalLM",
               dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}),
               settings={"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}}),
    FamilyCase("mistral-window", "MistralConfig", "MistralForCausalLM",
               dict(hidden_size=48, intermediate_size=72, num_attention_heads=8, num_key_value_heads=4, head_dim=6,
                    sliding_window=4),
               settings={"sliding_window": 4}),
    FamilyCase("qwen2-bias", "Qwen2Config", "Qwen2ForCausalLM",
               dict(hidden_size=56, intermediate_size=64, num_attention_heads=14, num_key_value_heads=2,
                    tie_word_embeddings=True),
               settings={"tie_word_embeddings": True}),
    FamilyCase("qwen3-qknorm", "Qwen3Config", "Qwen3ForCausalLM",
               dict(hidden_size=40, intermediate_size=60, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
               settings={"head_dim": 8}),
    FamilyCase("gemma2-caps", "Gemma2Config", "Gemma2ForCausalLM",
               dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=12, sliding_window=4, final_logit_softcapping=2.0,
                    attn_logit_softcapping=3.0),
               settings={"query_pre_attn_scalar": 12, "sliding_window": 4, "final_logit_softcapping": 2.0,
                         "attn_logit_softcapping": 3.0, "head_dim": 16,
                         "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    FamilyCase("gemma3-localglobal", "Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=16, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
               settings={"sliding_window": 4, "head_dim": 16,
                         "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                         "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                             "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    FamilyCase("phi3-fused", "Phi3Config", "Phi3ForCausalLM",
               dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=5,
                    original_max_position_embeddings=64, partial_rotary_factor=0.5, rope_scaling=_PHI_ROPE),
               settings={"sliding_window": 5, "original_max_position_embeddings": 64, "tie_word_embeddings": True,
                         "partial_rotary_factor": 0.5, "rope_parameters": _PHI_ROPE_SAVED}),
    FamilyCase("olmo2-postnorm", "Olmo2Config", "Olmo2ForCausalLM",
               dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                    attention_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0),
               settings={"attention_bias": True}),
    FamilyCase("granite-scales", "GraniteConfig", "GraniteForCausalLM",
               dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                    attention_bias=True, tie_word_embeddings=True, embedding_multiplier=3.0,
                    residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=4.0),
               settings={"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.25,
                         "logits_scaling": 4.0, "attention_bias": True}),
)
CASE_IDS = [c.name for c in CASES]


def make_model(case: FamilyCase, seed: int = 0) -> torch.nn.Module:
    """A float32 random model of the case's family in eval mode, with weights spread so heads differ."""
    import transformers

    config = getattr(transformers, case.config_class)(**_COMMON, **case.kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, case.model_class)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + torch.rand_like(p))
            if p.dim() == 1 and p.shape[0] != config.hidden_size:  # biases and per-head norms: non-trivial
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 1 and "Gemma" in case.config_class:  # Gemma's norms scale by 1 + w, from w = 0
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@lru_cache(maxsize=1)
def _trained_bpe() -> Any:
    """A byte-level BPE of ``VOCAB`` tokens trained on the first 50 kB of WikiText-2 valid (every family's
    tokenizer class reads it the same way, so folder reloads can be compared token by token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    data = find_data_dir()
    if data is None:
        raise RuntimeError("WikiText-2 raw data not found (see conftest.wikitext_dir)")
    text = (data / "valid.txt").read_text(encoding="utf-8")[:50_000]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([text], trainer)
    return backend.to_str()


def make_tokenizer():
    """A fresh fast tokenizer over the tiny vocabulary (see ``_trained_bpe``)."""
    import transformers
    from tokenizers import Tokenizer

    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_bpe()))


# Start of a script run as `python -I -S -c SCRIPT SITE_DIRS ...`: layerprune cannot be imported in it, and
# the site-packages in SITE_DIRS (os.pathsep-separated, no .pth processing) give torch and transformers.
BLOCK_LAYERPRUNE = """
import importlib.abc, os, sys

class BlockLayerprune(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "layerprune" or name.startswith("layerprune."):
            raise ImportError("layerprune is blocked in this test")
        return None

sys.meta_path.insert(0, BlockLayerprune())
sys.path.extend(sys.argv[1].split(os.pathsep))
try:
    import layerprune  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("layerprune is importable: the test is not isolated")
"""


def token_ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# The plain method (removal layer importance, Taylor scores, no refit): what the tests of one stage run, so that a
# tiny model needs no refit batch. PruneConfig's own defaults are the best measured method (tests/test_config.py).
PLAIN_METHOD = dict(importance="taylor", layer_importance="removal", refit="none")


def plain_config(**fields: Any) -> Any:
    """A PruneConfig of ``fields``, the plain method where they say nothing."""
    from layerprune.pruning import PruneConfig

    return PruneConfig(**{**PLAIN_METHOD, **fields})
