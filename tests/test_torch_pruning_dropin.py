"""`layerprune.torch_pruning.MetaPruner`, the drop-in for Torch-Pruning's MetaPruner.

* Its groups are Torch-Pruning's: item for item (module, handler, idxs, root_idxs) equal to
  `DependencyGraph.get_pruning_group` where Torch-Pruning's traversal is right (every MLP, attention without
  GQA), and under GQA folding each query head onto its KV head (checked against sums written out here).
* Where Torch-Pruning 1.6.1's own MetaPruner finishes (a tiny MHA Llama), both remove the same heads and channels.
* On every family it gives the same model as layerprune's `prune` for the same plan (uniform and unbalanced).
* Torch-Pruning's local / global / isomorphic arithmetic, iterative steps, interactive groups, the history, and
  one clear error line for every argument it cannot honour.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as real_tp
from conftest import make_tiny_llama
from families import CASE_IDS, CASES, logits, make_model, token_ids, plain_config
from torch import nn

import layerprune.torch_pruning as tp
from layerprune.allocation import from_pruning_ratio_dict, to_pruning_ratio_dict
from layerprune.arch import adapter_for
from layerprune.allocation.ratio_dict import ATTENTION, MLP, Structure
from layerprune.arch import layer_shapes
from layerprune.errors import InvalidInputError, ModelError
from layerprune.models import count_parameters, load_pruned
from layerprune.pruning import prune
from layerprune.scoring.groups import element_group_scores
from layerprune.torch_pruning import GroupBuilder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GQA_CASES = [c for c in CASES if c.kwargs["num_attention_heads"] != c.kwargs["num_key_value_heads"]]
MHA_CASE = next(c for c in CASES if c.name == "llama2-mha")


def backward(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def roots(model, layers=None):
    chosen = list(model.model.layers) if layers is None else [model.model.layers[i] for i in layers]
    return [layer.self_attn.k_proj for layer in chosen] + [layer.mlp.gate_proj for layer in chosen]


def llm_pruner_kwargs(model, layers=None, **extra):
    """What LLM-Pruner's llama3.py passes besides the importance and the rates."""
    kwargs = {
        "consecutive_groups": {layer.self_attn.k_proj: layer.self_attn.head_dim for layer in model.model.layers},
        "customized_pruners": {type(model.model.norm): tp.RMSNormPruner()},
        "root_module_types": None,
        "root_instances": roots(model, layers),
        "ignored_layers": [],
        "channel_groups": {},
    }
    kwargs.update(extra)
    return kwargs


def projection_items(group):
    """(module, handler, idxs, root_idxs) of the group's items on real projections, in order."""
    return [(id(dep.target.module), dep.handler, list(idxs), list(group[i].root_idxs))
            for i, (dep, idxs) in enumerate(group) if isinstance(dep.target.module, nn.Linear)]


def torch_pruning_graph(model, ids):
    """Torch-Pruning's graph of ``model`` as layerprune holds it (fused projections split first)."""
    adapter_for(model).decoder_layers(model)
    return real_tp.DependencyGraph().build_dependency(
        model, example_inputs=ids, forward_fn=lambda m, x: m(input_ids=x, use_cache=False),
        output_transform=lambda out: out.logits, verbose=False)


def same_scores(ours, theirs, ctx):
    assert theirs is not None and ours is not None, ctx
    assert ours.shape == theirs.shape, ctx
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6 * float(theirs.abs().max()), msg=ctx)


def importances():
    return [
        real_tp.importance.GroupTaylorImportance(),
        real_tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, multivariable=True),
        real_tp.importance.GroupTaylorImportance(group_reduction="first", bias=True),
        real_tp.importance.GroupMagnitudeImportance(p=1, group_reduction="max", normalizer="max", bias=True),
        real_tp.importance.GroupMagnitudeImportance(p=2, group_reduction="prod"),
        tp.importance.KernelTaylorImportance(),
    ]


# ---- groups ------------------------------------------------------------------------------------------------


UNFUSED_CASES = [c for c in CASES if "fused" not in c.name]


@pytest.mark.parametrize("case", UNFUSED_CASES, ids=[c.name for c in UNFUSED_CASES])
def test_mlp_groups_are_torch_pruning_groups(case):
    model = make_model(case)
    ids = token_ids()
    graph = torch_pruning_graph(model, ids)
    backward(model, ids)
    builder = GroupBuilder(model)
    for index, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate_proj
        theirs = graph.get_pruning_group(gate, real_tp.prune_linear_out_channels, list(range(gate.out_features)))
        ours = builder.group(Structure(index, MLP))
        assert projection_items(ours) == projection_items(theirs)
        assert len(ours) == 3
        for imp in importances():
            same_scores(imp(ours), imp(theirs), f"{case.name} layer {index} {type(imp).__name__}")


def test_torch_pruning_maps_a_fused_mlp_channel_to_rows_past_the_projection():
    """Phi-3's gate_up_proj, split, is concatenated then chunked in its forward. Torch-Pruning's graph carries channel
    c through that concatenation as rows c and c + width of both gate_proj and up_proj (rows that do not exist);
    layerprune's group is gate row c, up row c and down_proj column c, the one that equals the masked dense model
    (``test_families.test_pruned_logits_equal_masked_dense[phi3-fused]``)."""
    (case,) = [c for c in CASES if "fused" in c.name]
    model = make_model(case)
    graph = torch_pruning_graph(model, token_ids())
    layer = model.model.layers[0]
    width = layer.mlp.gate_proj.out_features
    theirs = {dep.target.module: idxs for dep, idxs in
              graph.get_pruning_group(layer.mlp.gate_proj, real_tp.prune_linear_out_channels, idxs=[1])}
    assert sorted(theirs[layer.mlp.gate_proj]) == sorted(theirs[layer.mlp.up_proj]) == [1, width + 1]
    assert list(theirs[layer.mlp.down_proj]) == [1]
    items = projection_items(GroupBuilder(model).group(Structure(0, MLP)))
    assert [m for m, *_ in items] == [id(layer.mlp.gate_proj), id(layer.mlp.up_proj), id(layer.mlp.down_proj)]
    assert all(idxs == list(range(width)) for _, _, idxs, _ in items)


def test_attention_groups_are_torch_pruning_groups_without_gqa():
    """With one query head per KV head Torch-Pruning's traversal from k_proj is right; ours is the same group."""
    model = make_model(MHA_CASE)
    ids = token_ids()
    graph = torch_pruning_graph(model, ids)
    backward(model, ids)
    builder = GroupBuilder(model)
    for index, layer in enumerate(model.model.layers):
        k_proj = layer.self_attn.k_proj
        theirs = graph.get_pruning_group(k_proj, real_tp.prune_linear_out_channels, list(range(k_proj.out_features)))
        ours = builder.group(Structure(index, ATTENTION))
        items = projection_items(ours)
        assert items == projection_items(theirs)
        assert [m for m, *_ in items] == [id(layer.self_attn.k_proj), id(layer.self_attn.o_proj),
                                          id(layer.self_attn.v_proj), id(layer.self_attn.q_proj)]
        for imp in importances():
            same_scores(imp(ours), imp(theirs), f"layer {index} {type(imp).__name__}")


@pytest.mark.parametrize("case", GQA_CASES, ids=[c.name for c in GQA_CASES])
def test_gqa_groups_fold_query_heads_onto_their_kv_head(case):
    """Group L1 per KV head j = k and v rows of head j + q rows and o_proj columns of query heads r*j .. r*j+r-1."""
    model = make_model(case)
    builder = GroupBuilder(model)
    imp = real_tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
    for index, shape in enumerate(layer_shapes(model)):
        attn = model.model.layers[index].self_attn
        hd, kv = shape["head_dim"], shape["num_kv_heads"]
        r = shape["num_q_heads"] // kv
        rows = imp(builder.group(Structure(index, ATTENTION)))
        assert rows.numel() == kv * hd
        written_out = torch.stack([
            attn.k_proj.weight[j * hd:(j + 1) * hd].abs().sum() + attn.v_proj.weight[j * hd:(j + 1) * hd].abs().sum()
            + attn.q_proj.weight[r * j * hd:(r * j + r) * hd].abs().sum()
            + attn.o_proj.weight[:, r * j * hd:(r * j + r) * hd].abs().sum() for j in range(kv)])
        torch.testing.assert_close(rows.view(kv, hd).sum(1), written_out.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", GQA_CASES, ids=[c.name for c in GQA_CASES])
def test_gqa_taylor_groups_equal_layerprunes_fold(case):
    model = make_model(case)
    ids = token_ids(batch=2, length=10, seed=1)
    kv_scores, channel_scores = element_group_scores(model, ids, importance="taylor", progress=False)
    backward(model, ids)
    builder = GroupBuilder(model)
    imp = real_tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None)
    for index, shape in enumerate(layer_shapes(model)):
        rows = imp(builder.group(Structure(index, ATTENTION)))
        torch.testing.assert_close(rows.view(shape["num_kv_heads"], -1).sum(1), kv_scores[index], rtol=1e-4, atol=0)
        torch.testing.assert_close(imp(builder.group(Structure(index, MLP))), channel_scores[index], rtol=1e-4, atol=0)


# ---- against Torch-Pruning's own MetaPruner ----------------------------------------------------------------


@pytest.mark.parametrize("rates", [((0.25, 0.25), (0.25, 0.25)), ((0.5, 0.3), (0.25, 0.5))])
def test_same_heads_and_channels_as_torch_pruning_metapruner(rates):
    """Torch-Pruning 1.6.1 finishes on this tiny MHA Llama; it removes whole heads through num_heads /
    prune_num_heads (its attention root needs a width rate above 0 to reach the head step, and removes
    ceil(rate * heads)). Both give the same model for the same Taylor importance and rates."""
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    theirs, ours = (make_tiny_llama(num_heads=8, num_kv_heads=8, head_dim=8, layers=2) for _ in range(2))
    for model in (theirs, ours):
        model.config.use_cache = False
        backward(model, ids)
    layers = theirs.model.layers
    pruner = real_tp.pruner.MetaPruner(
        theirs, ids, importance=real_tp.importance.GroupTaylorImportance(), pruning_ratio=0.0,
        pruning_ratio_dict={**{l.self_attn.k_proj: 0.25 for l in layers},
                            **{l.mlp.gate_proj: mlp for l, (_, mlp) in zip(layers, rates)}},
        num_heads={m: 8 for l in layers for m in (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj)},
        prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio_dict={l.self_attn: attn for l, (attn, _) in zip(layers, rates)},
        ignored_layers=[theirs.lm_head], output_transform=lambda out: out.logits)
    pruner.step()
    mine = tp.pruner.MetaPruner(
        ours, ids, importance=tp.importance.GroupTaylorImportance(), pruning_ratio=0.0,
        pruning_ratio_dict={m: rate for l, pair in zip(ours.model.layers, rates)
                            for m, rate in zip((l.self_attn.k_proj, l.mlp.gate_proj), pair)},
        **llm_pruner_kwargs(ours))
    mine.step()
    expected = {name: p.shape for name, p in theirs.named_parameters()}
    assert {name: p.shape for name, p in ours.named_parameters()} == expected
    assert expected["model.layers.1.self_attn.q_proj.weight"] != (64, 48)  # something was pruned
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), name


# ---- against layerprune's own prune ------------------------------------------------------------------------


def _same_model(a, b):
    assert layer_shapes(a) == layer_shapes(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_uniform_range_equals_layerprune_prune(case):
    """LLM-Pruner's llama3.py block-wise call (layers 1.. only) = prune(mode="uniform", layer_start=1)."""
    dense = make_model(case)
    ids = token_ids(batch=4, length=16, seed=3)
    result = prune(dense, None, plain_config(ratio=0.5, mode="uniform", layer_start=1), calib_ids=ids, progress=False)
    model = copy.deepcopy(dense)
    backward(model, ids)
    pruner = tp.pruner.MetaPruner(model, ids, importance=tp.importance.GroupTaylorImportance(group_reduction="sum"),
                                  ch_sparsity=0.5, **llm_pruner_kwargs(model, layers=range(1, len(model.model.layers))))
    pruner.step()
    _same_model(model, result.model)
    report = result.report["layers"]
    assert [list(k.kv_heads) for k in pruner.kept()] == [entry["kv_heads_kept"] for entry in report]
    assert [list(k.mlp_channels) for k in pruner.kept()] == [entry["mlp_channels_kept"] for entry in report]
    assert layer_shapes(model)[0] == layer_shapes(dense)[0] != layer_shapes(model)[1]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_unbalanced_plan_through_the_rate_dictionary_equals_layerprune_prune(case):
    """prune(unbalanced, dp) -> to_pruning_ratio_dict -> MetaPruner gives prune's model, weight for weight."""
    dense = make_model(case)
    ids = token_ids(batch=4, length=16, seed=3)
    result = prune(dense, None, plain_config(ratio=0.3, layer_importance="removal", solver="dp"), calib_ids=ids,
                   progress=False)
    model = copy.deepcopy(dense)
    rates = to_pruning_ratio_dict(model, result.allocation)
    assert list(rates) == [m for layer in model.model.layers for m in (layer.self_attn.k_proj, layer.mlp.gate_proj)]
    plan = from_pruning_ratio_dict(model, rates)
    assert [(a.kv_groups_kept, a.mlp_kept, a.params_kept) for a in plan.layers] == \
        [(a.kv_groups_kept, a.mlp_kept, a.params_kept) for a in result.allocation.layers]
    assert plan.params_after == result.allocation.params_after
    backward(model, ids)
    pruner = tp.pruner.MetaPruner(model, ids, importance=tp.importance.GroupTaylorImportance(),
                                  ch_sparsity_dict=rates, ch_sparsity=0.0, **llm_pruner_kwargs(model))
    pruner.step()
    _same_model(model, result.model)
    assert count_parameters(model)["total"] == result.allocation.params_after


# ---- Torch-Pruning's arithmetic ----------------------------------------------------------------------------


def _gqa_model(layers=3, seed=0):
    return make_tiny_llama(num_heads=12, num_kv_heads=4, head_dim=4, hidden=36, intermediate=60, layers=layers, seed=seed)


def _ids(batch=2, length=12, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _counts(model):
    return [(s["num_kv_heads"], s["intermediate"]) for s in layer_shapes(model)]


def test_iterative_steps_follow_torch_pruning_counts_and_land_on_the_plan():
    model = _gqa_model()
    assert model.config.use_cache  # as loaded: Torch-Pruning's own trace trips on the cache (LLM-Pruner #93)
    ids = _ids()
    rates = {l.self_attn.k_proj: rate for l, rate in zip(model.model.layers, (0.3, 0.55, 0.8))}
    rates.update({l.mlp.gate_proj: rate for l, rate in zip(model.model.layers, (0.1, 0.37, 0.66))})
    plan = from_pruning_ratio_dict(model, rates)
    pruner = tp.pruner.MetaPruner(model, ids, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.0,
                                  pruning_ratio_dict=rates, iterative_steps=3, **llm_pruner_kwargs(model))
    initial = _counts(model)
    for step in (1, 2, 3):
        before = _counts(model)
        pruner.step()
        for (kv, ch), (kv0, ch0), (kv_now, ch_now), layer in zip(before, initial, _counts(model), model.model.layers):
            attn, mlp = rates[layer.self_attn.k_proj] * step / 3, rates[layer.mlp.gate_proj] * step / 3
            assert kv - kv_now == (kv * 4 - int(kv0 * 4 * (1 - attn))) // 4
            assert ch - ch_now == ch - int(ch0 * (1 - mlp))
    assert _counts(model) == [(a.kv_groups_kept, a.mlp_kept) for a in plan.layers]
    with pytest.warns(UserWarning, match="maximum iterative steps"):
        pruner.step()
    assert _counts(model) == [(a.kv_groups_kept, a.mlp_kept) for a in plan.layers]


def _l1_units(model, layers):
    """Written-out group L1 per KV head and per channel (the sum reduction over the coupled projections)."""
    out = {}
    for index in layers:
        layer = model.model.layers[index]
        attn, mlp = layer.self_attn, layer.mlp
        hd = 4
        r = attn.q_proj.out_features // attn.k_proj.out_features
        kv = attn.k_proj.out_features // hd
        out[Structure(index, ATTENTION)] = [float((
            attn.k_proj.weight[j * hd:(j + 1) * hd].abs().sum() + attn.v_proj.weight[j * hd:(j + 1) * hd].abs().sum()
            + attn.q_proj.weight[r * j * hd:(r * j + r) * hd].abs().sum()
            + attn.o_proj.weight[:, r * j * hd:(r * j + r) * hd].abs().sum()).detach()) for j in range(kv)]
        out[Structure(index, MLP)] = (mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                                      + mlp.down_proj.weight.abs().sum(0)).detach().tolist()
    return out


def _kept_by_threshold(scores, scopes, rate):
    """Per scope of structures: drop every unit at or below the k-th lowest, k = n - int(n * (1 - rate))."""
    kept = {}
    for members in scopes:
        pooled = sorted(v for s in members for v in scores[s])
        count = len(pooled) - int(len(pooled) * (1 - rate))
        threshold = pooled[count - 1]
        for s in members:
            kept[s] = tuple(i for i, v in enumerate(scores[s]) if v > threshold)
    return kept


@pytest.mark.parametrize("isomorphic", [False, True])
def test_global_pruning_ranks_units_across_layers(isomorphic):
    model = _gqa_model()
    ids = _ids()
    scores = _l1_units(model, range(3))
    structures = sorted(scores)
    scopes = ([[s for s in structures if s.kind == ATTENTION], [s for s in structures if s.kind == MLP]]
              if isomorphic else [structures])
    expected = _kept_by_threshold(scores, scopes, 0.4)
    imp = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
    pruner = tp.pruner.MetaPruner(model, ids, importance=imp, pruning_ratio=0.4, global_pruning=True,
                                  isomorphic=isomorphic, **llm_pruner_kwargs(model))
    pruner.step()
    kept = pruner.kept()
    for s in structures:
        got = kept[s.layer].kv_heads if s.kind == ATTENTION else kept[s.layer].mlp_channels
        assert got == expected[s], s
    if isomorphic:
        assert sum(_counts(model)[i][0] for i in range(3)) == int(12 * 0.6)


def test_global_pruning_ranks_a_tuple_key_as_its_own_scope():
    model = _gqa_model()
    ids = _ids()
    layers = model.model.layers
    scores = _l1_units(model, range(3))
    inside = [Structure(i, kind) for i in (1, 2) for kind in (ATTENTION, MLP)]
    expected = {**_kept_by_threshold(scores, [inside], 0.5),
                **_kept_by_threshold(scores, [[Structure(0, ATTENTION), Structure(0, MLP)]], 0.2)}
    imp = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)
    pruner = tp.pruner.MetaPruner(model, ids, importance=imp, pruning_ratio=0.2, global_pruning=True,
                                  pruning_ratio_dict={(layers[1], layers[2]): 0.5}, **llm_pruner_kwargs(model))
    pruner.step()
    for s, want in expected.items():
        keep = pruner.kept()[s.layer]
        assert (keep.kv_heads if s.kind == ATTENTION else keep.mlp_channels) == want, s


def test_interactive_groups_prune_what_step_prunes():
    ids = _ids()
    direct, interactive = _gqa_model(), _gqa_model()
    for model in (direct, interactive):
        backward(model, ids)
    kwargs = dict(importance=tp.importance.GroupTaylorImportance(), pruning_ratio=0.5)
    tp.pruner.MetaPruner(direct, ids, **kwargs, **llm_pruner_kwargs(direct)).step()
    pruner = tp.pruner.MetaPruner(interactive, ids, **kwargs, **llm_pruner_kwargs(interactive))
    groups = list(pruner.step(interactive=True))
    assert len(groups) == 6 and all(isinstance(g, real_tp.dependency.Group) for g in groups)
    attention = next(g for g in groups if g.structure.kind == ATTENTION)
    assert len(attention[0].idxs) == 2 * 4 and len(attention[3].idxs) == 2 * 3 * 4  # 2 KV heads, 6 query heads
    for group in groups:
        group.prune()
    _same_model(direct, interactive)
    history = pruner.pruning_history()
    replayed = _gqa_model()
    tp.pruner.MetaPruner(replayed, ids, **kwargs, **llm_pruner_kwargs(replayed)).load_pruning_history(history)
    _same_model(direct, replayed)


def test_a_group_prunes_whole_kv_heads_only():
    model = _gqa_model()
    pruner = tp.pruner.MetaPruner(model, None, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
                                  **llm_pruner_kwargs(model))
    group = next(iter(pruner.step(interactive=True)))
    with pytest.raises(InvalidInputError, match="whole KV heads"):
        group.prune(idxs=[0, 1])
    assert _counts(model) == [(4, 60)] * 3
    group.prune(idxs=[4, 5, 6, 7])
    assert _counts(model)[0] == (3, 60)


def test_ignored_layers_and_rates_above_a_layer():
    model = _gqa_model()
    layers = model.model.layers
    pruner = tp.pruner.MetaPruner(model, None, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
                                  pruning_ratio_dict={layers[2]: 0.25}, **llm_pruner_kwargs(model, ignored_layers=[layers[0]]))
    pruner.step()
    assert _counts(model) == [(4, 60), (2, 30), (3, 45)]


def test_any_torch_pruning_importance_scores_the_groups():
    ids = _ids()
    model = _gqa_model()
    activation = real_tp.importance.ActivationImportance()  # scores o_proj / down_proj inputs only
    for imp in (real_tp.importance.RandomImportance(), real_tp.importance.LAMPImportance(), activation,
                tp.importance.ActivationStatsImportance("wanda")):
        model = _gqa_model()
        if isinstance(imp, tp.importance.ActivationStatsImportance):
            with imp.collect(model), torch.no_grad():
                model(input_ids=ids)
        elif imp is activation:
            with imp.compute_importance(model), torch.no_grad():
                model(input_ids=ids)
        tp.pruner.MetaPruner(model, ids, importance=imp, pruning_ratio=0.5, **llm_pruner_kwargs(model)).step()
        assert _counts(model) == [(2, 30)] * 3, type(imp).__name__


def test_pruned_model_reloads_at_a_rate_that_is_not_k_over_num_kv(tmp_path):
    """Torch-Pruning #495: pruned GQA models reload only at k/num_kv rates. Here the layers keep 4, 3 and 2 of
    their 4 KV groups and 42 of 60 channels, and the saved folder reloads with the same logits."""
    from families import make_tokenizer

    from layerprune.export import save_pruned

    model = _gqa_model()
    rates = {l.self_attn.k_proj: rate for l, rate in zip(model.model.layers, (0.1, 0.2, 0.45))}
    tp.pruner.MetaPruner(model, None, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.3,
                         pruning_ratio_dict=rates, **llm_pruner_kwargs(model)).step()
    assert [kv for kv, _ in _counts(model)] == [4, 3, 2]
    folder = save_pruned(model, make_tokenizer(), tmp_path / "pruned")
    reloaded, _ = load_pruned(folder)
    ids = _ids(batch=1, length=9, seed=5)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=2e-5, rtol=0)


# ---- arguments it cannot honour ----------------------------------------------------------------------------


def _error(model, **kwargs):
    base = dict(importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5)
    with pytest.raises(InvalidInputError) as info:
        tp.pruner.MetaPruner(model, None, **{**base, **llm_pruner_kwargs(model), **kwargs}).step()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_unhonoured_argument_is_one_error_line_naming_it():
    model = _gqa_model()
    layer = model.model.layers[0]
    attn = layer.self_attn
    cases = {
        "root_module_types": dict(root_module_types=[nn.Linear], root_instances=None),
        "root_instances": dict(root_instances=[attn.o_proj]),
        "consecutive_groups": dict(consecutive_groups={}),
        "channel_groups": dict(channel_groups={attn.q_proj: 4}),
        "out_channel_groups": dict(out_channel_groups={layer.mlp.gate_proj: 2}),
        "num_heads": dict(num_heads={attn.q_proj: 12}),
        "prune_num_heads": dict(prune_num_heads=True),
        "head_pruning_ratio": dict(head_pruning_ratio=0.5),
        "pruning_ratio_dict": dict(pruning_ratio_dict={attn.o_proj: 0.5}),
        "customized_pruners": dict(customized_pruners={type(attn): tp.RMSNormPruner()}),
        "ch_sparsity": dict(ch_sparsity=0.3),
        "pruning_ratio": dict(pruning_ratio=1.0),
        "iterative_steps": dict(iterative_steps=0),
        "importance": dict(importance=None),
        "round_to": dict(round_to=2, global_pruning=True),
    }
    for argument, kwargs in cases.items():
        assert argument in _error(model, **kwargs), argument
    assert "GQA ratio is 3" in _error(model, channel_groups={attn.q_proj: 4})
    assert "hidden size" in _error(model, root_instances=[attn.o_proj])
    assert "must share one rate" in _error(model, pruning_ratio_dict={attn.q_proj: 0.5, attn.k_proj: 0.25})
    assert "all 4 KV groups" in _error(model, pruning_ratio_dict={layer: 0.999})
    assert "is not a projection" in _error(model, root_instances=[attn])
    assert _error(model, ch_sparsity_dict={attn.o_proj: 0.5}, pruning_ratio=None).startswith("ch_sparsity_dict")


def test_taylor_importance_without_gradients_says_so():
    model = _gqa_model()
    with pytest.raises(InvalidInputError, match=r"needs gradients .* run loss.backward\(\) before step\(\)"):
        tp.pruner.MetaPruner(model, None, importance=tp.importance.GroupTaylorImportance(),
                             **llm_pruner_kwargs(model)).step()


def test_channel_groups_equal_to_the_gqa_ratio_are_accepted():
    model = _gqa_model()
    attn = model.model.layers[0].self_attn
    tp.pruner.MetaPruner(model, None, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
                         **llm_pruner_kwargs(model, channel_groups={attn.q_proj: 3, attn.k_proj: 1})).step()
    assert _counts(model)[0] == (2, 30)


def test_default_root_types_work_when_the_hidden_size_roots_stay_at_rate_zero():
    """Torch-Pruning's default roots (every Linear) also root o_proj, down_proj and lm_head: fine at rate 0."""
    model = _gqa_model()
    layers = model.model.layers
    rates = {**{l.self_attn.k_proj: 0.5 for l in layers}, **{l.mlp.gate_proj: 0.5 for l in layers}}
    kwargs = llm_pruner_kwargs(model)
    del kwargs["root_module_types"], kwargs["root_instances"]
    tp.pruner.MetaPruner(model, None, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.0,
                         pruning_ratio_dict=rates, **kwargs).step()
    assert _counts(model) == [(2, 30)] * 3


def test_an_unsupported_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    with pytest.raises(ModelError, match="supported architectures"):
        tp.pruner.MetaPruner(model, None, importance=tp.importance.GroupMagnitudeImportance())


def test_wrong_length_importance_is_refused():
    model = _gqa_model()

    def broken(group):
        return torch.ones(3)

    with pytest.raises(InvalidInputError, match="importance: returned 3 scores"):
        tp.pruner.MetaPruner(model, None, importance=broken, **llm_pruner_kwargs(model)).step()
