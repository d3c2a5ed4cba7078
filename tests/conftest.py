"""Shared fixtures: tiny random Llama models (any GQA ratio) and the WikiText-2 folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Triton kernels run on CPU through the interpreter; it must be set before triton is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    """The WikiText-2 raw folder (test.txt, valid.txt). Missing data is a failure, not a skip."""
    from families import find_data_dir

    path = find_data_dir()
    if path is None:
        pytest.fail("WikiText-2 raw data not found: set LAYERPRUNE_TEST_DATA_DIR or provide ../shared/data/wikitext-2-raw")
    return path


def make_tiny_llama(
    num_heads: int = 8,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    hidden: int = 48,
    intermediate: int = 96,
    layers: int = 3,
    vocab: int = 128,
    seed: int = 0,
    tie: bool = False,
    bias: bool = False,
):
    """A randomly initialised LlamaForCausalLM in eval mode (float32, deterministic)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init makes every head look alike; spread the weights so scores differ between heads.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + torch.rand_like(p))
    return model.eval()


@pytest.fixture
def tiny_llama():
    """Factory fixture: `tiny_llama(num_heads=9, num_kv_heads=3)` builds a fresh tiny model."""
    return make_tiny_llama


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny-model tests: they gain nothing from threads,
    and on a busy 2-core machine spin-waiting makes them many times slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
