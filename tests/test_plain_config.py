"""A pruned model whose layers all have the same widths is saved under its family's own config (no remote code):
only num_attention_heads, num_key_value_heads and intermediate_size differ from the dense config (and head_dim
is written out where the dense config leaves it implicit)."""

from __future__ import annotations

import json

import pytest
import torch
from families import CASE_IDS, CASES, logits, make_model, make_tokenizer, token_ids, plain_config
from gguf_models import heterogeneous_keep, homogeneous_keep

from layerprune.arch import adapter_for, layer_shapes
from layerprune.export import MODELING_FILE, save_pruned
from layerprune.export.save import plain_config_obstacle
from layerprune.models import load_model, load_pruned
from layerprune.pruning import prune, pruned_copy
from layerprune.scoring.selection import LayerKeep

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHANGED = {"num_attention_heads", "num_key_value_heads", "intermediate_size"}
# Keys a save always writes: the dtype and tie of the tensors, layerprune's marker, the writer's version.
BOOKKEEPING = {"dtype", "torch_dtype", "tie_word_embeddings", "layerprune", "transformers_version", "_name_or_path"}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_homogeneous_model_gets_the_family_config(tmp_path, case):
    from transformers import AutoModelForCausalLM

    dense = make_model(case)
    pruned = pruned_copy(dense, homogeneous_keep(dense))
    folder = save_pruned(pruned, make_tokenizer(), tmp_path / "plain")
    obstacle = adapter_for(dense).plain_save_obstacle
    if obstacle is not None:  # Phi-3: saved split, with per-layer widths, and the reason said
        saved = json.loads((folder / "config.json").read_text())
        assert saved["architectures"] == [adapter_for(dense).pruned_architecture]
        assert plain_config_obstacle(pruned) == obstacle
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
        torch.testing.assert_close(logits(reloaded, token_ids()), logits(pruned, token_ids()), rtol=0, atol=1e-6)
        return

    saved = json.loads((folder / "config.json").read_text())
    original = json.loads(dense.config.to_json_string(use_diff=False))  # as a dense save writes it
    original["architectures"] = [case.model_class]
    assert saved["architectures"] == [case.model_class] and saved["model_type"] == original["model_type"]
    assert "auto_map" not in saved and not (folder / MODELING_FILE).exists()
    differing = {k for k in set(saved) | set(original) if saved.get(k) != original.get(k)} - BOOKKEEPING
    # head_dim is written out where the dense config leaves it implicit (Qwen2: hidden / heads no longer holds)
    assert differing == CHANGED | ({"head_dim"} if "head_dim" not in original else set())
    shape = layer_shapes(pruned)[0]
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["intermediate_size"]) == (
        shape["num_q_heads"], shape["num_kv_heads"], shape["intermediate"])
    ids = token_ids()
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False).eval()
    assert type(plain).__name__ == case.model_class
    torch.testing.assert_close(logits(plain, ids), logits(pruned, ids), rtol=0, atol=1e-6)
    reloaded, tokenizer = load_model(folder)
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), rtol=0, atol=1e-6)
    assert tokenizer is not None


def test_heterogeneous_model_keeps_the_remote_code_layout(tmp_path):
    dense = make_model(CASES[0])
    pruned = pruned_copy(dense, heterogeneous_keep(dense))
    folder = save_pruned(pruned, make_tokenizer(), tmp_path / "hetero")
    saved = json.loads((folder / "config.json").read_text())
    assert "auto_map" in saved and (folder / MODELING_FILE).is_file()
    assert saved["layer_intermediate_sizes"] == [s["intermediate"] for s in layer_shapes(pruned)]


def test_heads_that_do_not_divide_the_hidden_size_keep_the_remote_code(tmp_path, tiny_llama):
    """transformers' family configs refuse hidden_size % num_attention_heads != 0, even with head_dim set."""
    dense = tiny_llama(num_heads=12, num_kv_heads=4, head_dim=8, hidden=48, vocab=320)
    keep = [LayerKeep(kv_heads=(0, 1, 3), mlp_channels=tuple(range(0, 96, 2)))] * 3  # 9 query heads: 48 % 9 != 0
    pruned = pruned_copy(dense, keep)
    folder = save_pruned(pruned, make_tokenizer(), tmp_path / "nine")
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    torch.testing.assert_close(logits(load_pruned(folder)[0], token_ids()), logits(pruned, token_ids()))


def test_plain_config_can_be_turned_off(tmp_path):
    dense = make_model(CASES[0])
    pruned = pruned_copy(dense, homogeneous_keep(dense))
    folder = save_pruned(pruned, make_tokenizer(), tmp_path / "remote", plain_config=False)
    assert "auto_map" in json.loads((folder / "config.json").read_text())


def test_uniform_mode_over_all_layers_saves_a_plain_config(tmp_path):
    """`--mode uniform` (LLM-Pruner floors) over every layer gives equal widths, hence the family's config."""
    dense = make_model(CASES[0])
    calib = token_ids(batch=4, length=16, seed=3)
    result = prune(dense, None, plain_config(ratio=0.5, mode="uniform", calib_samples=4),
                   calib_ids=calib, progress=False)
    assert len({tuple(s.values()) for s in layer_shapes(result.model)}) == 1
    folder = save_pruned(result.model, make_tokenizer(), tmp_path / "uniform", report=result.report)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["layerprune"]["plain"] is True
    assert (saved["num_key_value_heads"], saved["intermediate_size"]) == (1, 40)
