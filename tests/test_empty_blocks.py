"""Empty blocks: a layer may lose its whole attention (zero KV groups) or its whole MLP (zero channels).

* On every family, the pruned model's logits equal the dense model's with the same heads and channels masked, decoding
  with a KV cache gives the logits of the whole forward (the empty attention keeps the cache's length), the parameter
  count is the budget formula's, and the folder reloads (layerprune's loader) with the same weights and logits.
* The allocation empties a block when that is cheapest: on a tiny Llama with a dead attention and a dead MLP, the
  default method with ``min_kv_groups=0, min_mlp_channels=0`` removes exactly those, at the exact budget, and the
  layer-by-layer executor writes the same tensors.
* Bad settings are refused in one line; GGUF layouts llama.cpp cannot run are refused with the reason.
  (llama.cpp itself runs the files in ``test_gguf_llamacpp.py``; plain transformers reloads them in
  ``test_families.py``.)
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from families import CASE_IDS, CASES, logits, make_model, make_tokenizer, plain_config, token_ids
from gguf_models import OLMO2, PHI3_MINI, empty_blocks_keep

from layerprune.allocation import spec_from_model_config
from layerprune.arch import adapter_for, check_consistency, layer_shapes
from layerprune.arch.modeling_layerprune import EmptyAttention, EmptyMLP
from layerprune.errors import InvalidInputError, ModelError
from layerprune.export import prune_checkpoint, save_pruned
from layerprune.export.gguf import plan_layout
from layerprune.models import count_parameters, load_pruned
from layerprune.pruning import PruneConfig, masked_dense_forward, prune, pruned_copy
from layerprune.scoring.selection import LayerKeep

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILIES = (*CASES, PHI3_MINI, OLMO2)


@pytest.fixture(scope="module", params=FAMILIES, ids=[*CASE_IDS, PHI3_MINI.name, OLMO2.name])
def emptied(request):
    dense = make_model(request.param)
    keep = empty_blocks_keep(dense)
    return dense, keep, pruned_copy(dense, keep)


def _incremental_logits(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits at positions prefix-1 .. end-1, from a prefill of ``prefix`` tokens and then one token at a time."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.25
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefix], use_cache=True, **{name: cache})
        rows = [out.logits[:, -1]]
        for t in range(prefix, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: cache})
            rows.append(out.logits[:, -1])
    assert cache.get_seq_length() == ids.shape[1]
    return torch.stack(rows, dim=1)


def test_empty_blocks_compute_the_masked_dense_model(emptied):
    dense, keep, pruned = emptied
    layers = adapter_for(pruned).decoder_layers(pruned)
    assert [isinstance(layer.self_attn, EmptyAttention) for layer in layers] == [True, True, False]
    assert [isinstance(layer.mlp, EmptyMLP) for layer in layers] == [False, True, True]
    check_consistency(pruned)
    assert [(s["num_kv_heads"], s["intermediate"]) for s in layer_shapes(pruned)] == [
        (len(k.kv_heads), len(k.mlp_channels)) for k in keep]
    ids = token_ids(seed=3)
    torch.testing.assert_close(logits(pruned, ids), masked_dense_forward(dense, ids, keep), atol=2e-5, rtol=0)
    # decoding with a cache: layer 0 has no head, yet the cache's length (read from its first layer) is kept
    whole = logits(pruned, ids)
    torch.testing.assert_close(_incremental_logits(pruned, ids, 5), whole[:, 4:], atol=2e-5, rtol=0)


def test_empty_blocks_count_as_the_budget_formula_says(emptied):
    dense, keep, pruned = emptied
    spec = spec_from_model_config(dense.config, 0.2)
    expected = sum(shape.params(kv_groups=len(k.kv_heads), mlp=len(k.mlp_channels))
                   for shape, k in zip(spec.layers, keep))
    assert count_parameters(pruned)["decoder_layers"] == expected


def test_empty_blocks_save_and_reload(tmp_path, emptied):
    _, keep, pruned = emptied
    folder = save_pruned(pruned, make_tokenizer(), tmp_path / "m")
    loaded, _ = load_pruned(folder)
    assert isinstance(adapter_for(loaded).decoder_layers(loaded)[1].self_attn, EmptyAttention)
    for (name, a), (_, b) in zip(loaded.named_parameters(), pruned.named_parameters()):
        assert a.shape == b.shape and torch.equal(a, b), name
    ids = token_ids(seed=7)
    torch.testing.assert_close(logits(loaded, ids), logits(pruned, ids), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# The allocation chooses empty blocks


def _dead_blocks_model(folder=None):
    """A tiny Llama (4 layers, 2 KV groups, 96 channels) whose layer 1 attention and layer 2 MLP output nothing."""
    from conftest import make_tiny_llama

    model = make_tiny_llama(num_heads=8, num_kv_heads=2, head_dim=8, hidden=48, intermediate=96, layers=4, vocab=64,
                            seed=0)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    if folder is not None:
        model.save_pretrained(folder, max_shard_size="40KB")
    return model


def _batches():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (4, 16), generator=generator), torch.randint(0, 64, (9, 12), generator=generator)


RATIO = 0.25


@pytest.mark.parametrize("floors", [(1, 1), (0, 0)])
def test_the_default_method_empties_dead_blocks_only_when_allowed(floors):
    model = _dead_blocks_model()
    calib, refit = _batches()
    config = PruneConfig(ratio=RATIO, min_kv_groups=floors[0], min_mlp_channels=floors[1], refit_samples=9,
                         refit_seq_len=12)
    result = prune(model, None, config, calib_ids=calib, refit_ids=refit, progress=False)
    kept = [(a.kv_groups_kept, a.mlp_kept) for a in result.allocation.layers]
    if floors == (0, 0):
        assert kept[1][0] == 0 and kept[2][1] == 0, kept
        assert sum(k == 0 for k, _ in kept) == 1 and sum(f == 0 for _, f in kept) == 1, kept
    else:
        assert min(k for k, _ in kept) >= 1 and min(f for _, f in kept) >= 1, kept
    before, after = count_parameters(model)["total"], count_parameters(result.model)["total"]
    assert after == result.allocation.params_after
    target = math.floor(RATIO * before + 0.5)
    assert target <= before - after <= target + result.allocation.granule
    check_consistency(result.model)


def test_layer_by_layer_executor_writes_the_same_empty_blocks(tmp_path):
    folder = tmp_path / "dense"
    model = _dead_blocks_model(folder)
    calib, refit = _batches()
    # the method both executors run (reconstruction curves are the in-memory executor's)
    config = PruneConfig(ratio=RATIO, min_kv_groups=0, min_mlp_channels=0, layer_importance="sensitivity",
                         importance="obs", refit="lstsq", refit_samples=9, refit_seq_len=12)
    memory = prune(model, None, config, calib_ids=calib, refit_ids=refit, progress=False)
    out, result = prune_checkpoint(folder, config, tmp_path / "seq", calib_ids=calib, refit_ids=refit, progress=False)
    kept = [(a.kv_groups_kept, a.mlp_kept) for a in memory.allocation.layers]
    assert kept[2][1] == 0, kept  # the dead MLP (its curve is 0 at every width)
    assert [(a.kv_groups_kept, a.mlp_kept) for a in result.allocation.layers] == kept
    loaded, _ = load_pruned(out)
    for (name, a), (_, b) in zip(loaded.named_parameters(), memory.model.named_parameters()):
        assert a.shape == b.shape and torch.equal(a, b), name
    torch.testing.assert_close(logits(loaded, calib), logits(memory.model, calib), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("field, value, match", [
    ("min_kv_groups", -1, "min_kv_groups: must be an integer >= 0"),
    ("min_mlp_channels", -1, "min_mlp_channels: must be an integer >= 0"),
    ("iterative_steps", 2, "empty blocks"),
])
def test_bad_floors_are_refused_in_one_line(field, value, match):
    config = plain_config(**{"ratio": 0.2, "min_kv_groups": 0, field: value})
    with pytest.raises(InvalidInputError, match=match) as err:
        prune(_dead_blocks_model(), None, config, calib_ids=_batches()[0], progress=False)
    assert "\n" not in str(err.value)


def test_gguf_refuses_what_llama_cpp_would_run_otherwise():
    """Qwen3's per-head q/k norms need its own architecture, which cannot say an empty block; an output bias on an
    empty block would be dropped by deci, which skips the block whole."""
    qwen3 = next(c for c in CASES if c.name == "qwen3-qknorm")
    dense = make_model(qwen3)
    with pytest.raises(ModelError, match="empty blocks.*no per-head q/k norms"):
        plan_layout(pruned_copy(dense, empty_blocks_keep(dense)))
    dense = make_model(CASES[0])
    keep = [LayerKeep((), tuple(range(s["intermediate"]))) if i == 1 else LayerKeep(tuple(range(s["num_kv_heads"])),
                                                                                     tuple(range(s["intermediate"])))
            for i, s in enumerate(layer_shapes(dense))]
    pruned = pruned_copy(dense, keep)
    layout = plan_layout(pruned)
    assert layout.architecture == "deci" and layout.num_kv_heads[1] == 0
    o_proj = adapter_for(pruned).decoder_layers(pruned)[1].self_attn.o_proj
    o_proj.bias = torch.nn.Parameter(torch.ones(o_proj.out_features))
    with pytest.raises(ModelError, match="o_proj / down_proj bias would be lost"):
        plan_layout(pruned)


# --------------------------------------------------------------------------------------------------------------
# Healing


def test_lora_adapts_only_projections_with_weights():
    """LoRA adapts only the projections that have weights, and merges back to the same widths (a full healing step
    around empty blocks: test_heal.py::test_one_step_lowers_the_loss)."""
    from layerprune.healing.lora import add_lora, lora_targets, merge_lora

    teacher = make_model(CASES[0])
    student = pruned_copy(teacher, empty_blocks_keep(teacher))
    widths = layer_shapes(student)
    targets = lora_targets(student)
    assert "model.layers.0.self_attn.q_proj" not in targets and "model.layers.1.mlp.down_proj" not in targets
    assert "model.layers.2.self_attn.q_proj" in targets and "model.layers.0.mlp.down_proj" in targets
    merged = merge_lora(add_lora(student, rank=4, alpha=8.0, dropout=0.0))
    assert layer_shapes(merged) == widths
