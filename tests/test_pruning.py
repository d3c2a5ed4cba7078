"""Pruning mechanics: GQA-correct KV-group removal and MLP channel removal, checked against a masked dense model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from layerprune.errors import InternalError, InvalidInputError, ModelError
from layerprune.arch import check_consistency, layer_shapes
from layerprune.pruning import StructuredPruner as LlamaStructuredPruner
from layerprune.pruning import masked_dense_forward
from layerprune.pruning import pruned_copy as prune_llama
from layerprune.scoring.selection import LayerKeep, select_keep

ATOL = 1e-5


def _ids(vocab: int = 128, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _random_keep(model, seed: int) -> list[LayerKeep]:
    """Random keep sets; layer 0 keeps only the LAST KV head, so a prefix-based pairing cannot pass by luck."""
    rng = np.random.default_rng(seed)
    keep = []
    for layer, shape in enumerate(layer_shapes(model)):
        n_kv, n_ch = shape["num_kv_heads"], shape["intermediate"]
        if layer == 0:
            kv = (n_kv - 1,)
        else:
            kv = tuple(sorted(rng.choice(n_kv, size=int(rng.integers(1, n_kv + 1)), replace=False).tolist()))
        ch = tuple(sorted(rng.choice(n_ch, size=int(rng.integers(1, n_ch)), replace=False).tolist()))
        keep.append(LayerKeep(kv_heads=kv, mlp_channels=ch))
    return keep


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# name: (num_heads, num_kv_heads, head_dim, hidden)
GQA = {
    "4:1": (8, 2, 8, 48),
    "3:1": (12, 3, 8, 48),
    "1:1": (4, 4, 8, 32),
    "7:1": (14, 2, 4, 56),
}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ratio", list(GQA))
def test_pruned_logits_equal_masked_dense(ratio, bias):
    heads, kv, head_dim, hidden = GQA[ratio]
    dense = make_tiny_llama(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, hidden=hidden, bias=bias, seed=3)
    before = _state(dense)
    keep = _random_keep(dense, seed=heads * 10 + kv)
    ids = _ids()

    pruned = prune_llama(dense, keep)

    # the input model is untouched
    after = _state(dense)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    r = heads // kv
    assert layer_shapes(pruned) == [
        {"num_q_heads": r * len(k.kv_heads), "num_kv_heads": len(k.kv_heads), "head_dim": head_dim,
         "intermediate": len(k.mlp_channels)}
        for k in keep
    ]
    check_consistency(pruned)
    reference = masked_dense_forward(dense, ids, keep)
    torch.testing.assert_close(_logits(pruned, ids), reference, atol=ATOL, rtol=0)
    # the masking itself matters (otherwise the comparison would be vacuous)
    assert (reference - _logits(dense, ids)).abs().max() > 1e-3


def test_generate_after_pruning():
    dense = make_tiny_llama(num_heads=12, num_kv_heads=3, head_dim=8, hidden=48, tie=True)
    keep = _random_keep(dense, seed=5)
    pruned = prune_llama(dense, keep)
    prompt = _ids(batch=1, length=6)
    out = pruned.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)
    # greedy decoding with the KV cache agrees with re-running the masked dense model on the growing sequence
    seq = prompt
    for _ in range(5):
        next_token = masked_dense_forward(dense, seq, keep)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(out, seq)


def test_eager_attention_matches_too():
    dense = make_tiny_llama(num_heads=12, num_kv_heads=3, head_dim=8, hidden=48, seed=7)
    dense.config._attn_implementation = "eager"
    keep = _random_keep(dense, seed=11)
    pruned = prune_llama(dense, keep)
    ids = _ids()
    torch.testing.assert_close(_logits(pruned, ids), masked_dense_forward(dense, ids, keep), atol=ATOL, rtol=0)


def _slice_layer(model, layer: int, kv_keep: list[int], q_heads_keep: list[int]) -> None:
    """Hand-made surgery with arbitrary query heads (to build deliberately wrong pairings)."""
    attn = model.model.layers[layer].self_attn
    hd = attn.head_dim
    kv_rows = [j * hd + d for j in kv_keep for d in range(hd)]
    q_rows = [h * hd + d for h in q_heads_keep for d in range(hd)]
    with torch.no_grad():
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            old = getattr(attn, name)
            new = torch.nn.Linear(old.in_features, len(rows), bias=old.bias is not None)
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
            setattr(attn, name, new)
        old = attn.o_proj
        new = torch.nn.Linear(len(q_rows), old.out_features, bias=old.bias is not None)
        new.weight.copy_(old.weight[:, q_rows])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        attn.o_proj = new


def test_wrong_query_head_pairings_fail_the_check():
    """The two known peer bugs give different logits, so the masked-dense comparison has teeth."""
    heads, kv = 12, 3
    r = heads // kv
    dense = make_tiny_llama(num_heads=heads, num_kv_heads=kv, head_dim=8, hidden=48, layers=1, seed=2)
    keep = [LayerKeep(kv_heads=(2,), mlp_channels=tuple(range(96)))]
    ids = _ids()
    reference = masked_dense_forward(dense, ids, keep)

    pairings = {
        "correct": [r * 2 + t for t in range(r)],  # heads 8..11
        "interleaved": [2 + t * kv for t in range(r)],  # heads 2, 5, 8, 11 (KV head j serving j, j+Hkv, ...)
        "prefix": list(range(r)),  # heads 0..3 (first query heads kept)
    }
    errors = {}
    for name, q_heads in pairings.items():
        model = copy.deepcopy(dense)
        _slice_layer(model, 0, [2], q_heads)
        errors[name] = (_logits(model, ids) - reference).abs().max().item()
    assert errors["correct"] < ATOL
    assert errors["interleaved"] > 1e-3
    assert errors["prefix"] > 1e-3
    # and the library's own result is the correct pairing
    torch.testing.assert_close(_logits(prune_llama(dense, keep), ids), reference, atol=ATOL, rtol=0)


def test_full_keep_leaves_layers_untouched():
    dense = make_tiny_llama(num_heads=8, num_kv_heads=2, head_dim=8, hidden=48, seed=4)
    shapes = layer_shapes(dense)
    full = LayerKeep(tuple(range(shapes[1]["num_kv_heads"])), tuple(range(shapes[1]["intermediate"])))
    keep = [LayerKeep((1,), (0, 3, 50)), full, LayerKeep((0, 1), (2, 4))]
    model = copy.deepcopy(dense)
    untouched = {name: p for name, p in model.model.layers[1].named_parameters()}
    LlamaStructuredPruner(model).prune(keep)
    for name, p in model.model.layers[1].named_parameters():
        assert p is untouched[name], name
    assert layer_shapes(model)[1] == shapes[1]
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), masked_dense_forward(dense, ids, keep), atol=ATOL, rtol=0)


def test_prune_twice_composes():
    dense = make_tiny_llama(num_heads=12, num_kv_heads=4, head_dim=8, hidden=48, layers=2, seed=6)
    first = [LayerKeep((0, 2, 3), tuple(range(0, 96, 2))), LayerKeep((1, 2, 3), tuple(range(60)))]
    second = [LayerKeep((1, 2), tuple(range(0, 48, 3))), LayerKeep((0,), (5, 59))]
    model = copy.deepcopy(dense)
    pruner = LlamaStructuredPruner(model)
    pruner.prune(first)
    pruner.prune(second)
    composed = [
        LayerKeep(tuple(a.kv_heads[i] for i in b.kv_heads), tuple(a.mlp_channels[i] for i in b.mlp_channels))
        for a, b in zip(first, second)
    ]
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), masked_dense_forward(dense, ids, composed), atol=ATOL, rtol=0)
    assert model.config.layer_num_key_value_heads == [2, 1]
    assert model.config.layer_intermediate_sizes == [16, 2]


def test_frozen_model_prunes_and_stays_frozen():
    dense = make_tiny_llama(num_heads=8, num_kv_heads=4, head_dim=8, hidden=48, seed=8)
    for p in dense.parameters():
        p.requires_grad_(False)
    keep = _random_keep(dense, seed=2)
    pruned = prune_llama(dense, keep)
    assert not any(p.requires_grad for p in pruned.parameters())
    assert not dense.training and not pruned.training
    ids = _ids()
    torch.testing.assert_close(_logits(pruned, ids), masked_dense_forward(dense, ids, keep), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "keep, message",
    [
        ([LayerKeep((1, 0), (0,))] * 3, "sorted and unique"),
        ([LayerKeep((0, 0), (0,))] * 3, "sorted and unique"),
        ([LayerKeep((2,), (0,))] * 3, "0..1"),
        ([LayerKeep((0,), (96,))] * 3, "0..95"),
        ([LayerKeep((0,), (0,))] * 2, "3 decoder layers"),
    ],
)
def test_bad_keep_is_refused(keep, message):
    dense = make_tiny_llama(num_heads=8, num_kv_heads=2, head_dim=8, hidden=48)
    with pytest.raises(InvalidInputError, match=message):
        prune_llama(dense, keep)
    with pytest.raises(InvalidInputError, match=message):
        masked_dense_forward(dense, _ids(), keep)


def test_non_llama_model_is_refused():
    with pytest.raises(ModelError):
        LlamaStructuredPruner(torch.nn.Linear(3, 3))


def test_check_consistency_catches_mismatched_shapes():
    model = make_tiny_llama(num_heads=8, num_kv_heads=2, head_dim=8, hidden=48)
    check_consistency(model)
    broken = copy.deepcopy(model)
    broken.model.layers[1].self_attn.o_proj = torch.nn.Linear(56, 48)  # o columns != q rows
    with pytest.raises(InternalError, match="o_proj columns"):
        check_consistency(broken)
    broken = copy.deepcopy(model)
    broken.model.layers[2].mlp.down_proj = torch.nn.Linear(90, 48)
    with pytest.raises(InternalError, match="MLP widths"):
        check_consistency(broken)
    broken = copy.deepcopy(model)
    attn = broken.model.layers[0].self_attn
    attn.q_proj = torch.nn.Linear(48, 24)  # 3 query heads for 2 KV heads
    attn.o_proj = torch.nn.Linear(24, 48)
    with pytest.raises(InternalError, match="not a multiple"):
        check_consistency(broken)


def _brute_force_keep(scores: np.ndarray, k: int) -> tuple[int, ...]:
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(ranked[:k]))


def test_select_keep_top_k_with_ties():
    rng = np.random.default_rng(0)
    kv_scores, ch_scores, kv_k, ch_k = [], [], [], []
    for layer in range(6):
        n_kv, n_ch = int(rng.integers(1, 7)), int(rng.integers(1, 30))
        kv_scores.append(rng.integers(0, 3, n_kv).astype(float))  # many ties
        ch_scores.append(torch.tensor(rng.integers(0, 4, n_ch), dtype=torch.float32))
        kv_k.append(int(rng.integers(1, n_kv + 1)))
        ch_k.append(int(rng.integers(1, n_ch + 1)))
    keep = select_keep(kv_scores, ch_scores, kv_k, ch_k)
    for layer, entry in enumerate(keep):
        assert entry.kv_heads == _brute_force_keep(kv_scores[layer], kv_k[layer])
        assert entry.mlp_channels == _brute_force_keep(ch_scores[layer].numpy(), ch_k[layer])
    assert select_keep([[1.0, 1.0, 1.0]], [[0.0, 2.0]], [2], [1]) == [LayerKeep((0, 1), (1,))]
    assert select_keep([[1.0, 1.0, 1.0]], [[0.0, 2.0]], [0], [0]) == [LayerKeep((), ())]  # empty blocks


@pytest.mark.parametrize(
    "args, message",
    [
        (([[1.0, 2.0]], [[1.0]], [-1], [1]), r"kv_groups_kept\[0\]=-1"),
        (([[1.0, 2.0]], [[1.0]], [3], [1]), r"kv_groups_kept\[0\]=3"),
        (([[1.0, 2.0]], [[1.0]], [1], [2]), r"mlp_kept\[0\]=2"),
        (([[1.0, float("nan")]], [[1.0]], [1], [1]), r"kv_group_scores\[0\]: contains NaN"),
        (([[1.0, 2.0]], [[1.0], [2.0]], [1], [1]), "channel_scores: has 2 layers"),
        (([[1.0, 2.0]], [[]], [1], [1]), r"channel_scores\[0\]: expected a non-empty"),
        (([[1.0, 2.0]], [[1.0]], [1.5], [1]), r"kv_groups_kept\[0\]: expected an integer"),
    ],
)
def test_select_keep_rejects_bad_input(args, message):
    with pytest.raises(InvalidInputError, match=message):
        select_keep(*args)


def test_select_keep_feeds_prune():
    dense = make_tiny_llama(num_heads=8, num_kv_heads=4, head_dim=8, hidden=48, seed=9)
    shapes = layer_shapes(dense)
    gen = torch.Generator().manual_seed(0)
    kv_scores = [torch.rand(s["num_kv_heads"], generator=gen) for s in shapes]
    ch_scores = [torch.rand(s["intermediate"], generator=gen) for s in shapes]
    keep = select_keep(kv_scores, ch_scores, [1, 3, 2], [10, 96, 40])
    assert keep[0].kv_heads == (int(kv_scores[0].argmax()),)
    pruned = prune_llama(dense, keep)
    assert [s["num_kv_heads"] for s in layer_shapes(pruned)] == [1, 3, 2]
    ids = _ids()
    torch.testing.assert_close(_logits(pruned, ids), masked_dense_forward(dense, ids, keep), atol=ATOL, rtol=0)
