"""The allocation search: its moves keep every budget exact (property-tested against the layer-shape formulas), its
fitness is the KL of the pruned model from the dense one computed directly, and it never returns an allocation
worse than its seed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from families import CASES, VOCAB, make_model, make_tokenizer, token_ids
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from layerprune.allocation import LayerShape, allocate, spec_from_model_config
from layerprune.allocation.knapsack import build_knapsack, choice_for, feasible, widths, windows
from layerprune.allocation.solve import AllocationSpec
from layerprune.errors import InfeasibleError, InvalidInputError
from layerprune.pruning import PruneConfig, StructuredPruner
from layerprune.pruning.config import resolve_config
from layerprune.pruning.search import FitnessModel, SearchSettings, VariantBank, mutate, search_allocation
from layerprune.refit import output_projection_grams
from layerprune.scoring.selection import LayerKeep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _budget_ok(spec: AllocationSpec, seed, kv: list[int], mlp: list[int]) -> None:
    """Every budget of ``seed``'s answer, recomputed from the layer shapes alone (not from the knapsack)."""
    after = spec.extra_params + sum(s.params(g, f) for s, g, f in zip(spec.layers, kv, mlp))
    removed = spec.params_total - after
    if seed.target_removed is not None:
        assert seed.target_removed <= removed <= seed.target_removed + seed.granule
    if seed.target_kv_cache_removed is not None:
        kv_after = sum(s.kv_cache_bytes(g, spec.kv_cache_dtype_bytes) for s, g in zip(spec.layers, kv))
        assert spec.kv_cache_bytes_total - kv_after >= seed.target_kv_cache_removed
    if seed.target_flops_removed is not None:
        fl_after = spec.extra_flops + sum(s.flops(g, f, spec.flops_seq_len) for s, g, f in zip(spec.layers, kv, mlp))
        assert spec.flops_total - fl_after >= seed.target_flops_removed
    for s, g, f in zip(spec.layers, kv, mlp):
        assert spec.min_kv_groups <= g <= s.num_kv_heads
        assert 0 < f <= s.intermediate and (f == s.intermediate or f % spec.mlp_step == 0)
        if spec.tie:
            assert abs(f / s.intermediate - g / s.num_kv_heads) <= 0.5 / s.num_kv_heads + 1e-12


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(2, 6),
    heads=st.sampled_from([(4, 2), (6, 3), (8, 8), (8, 4)]),
    intermediate=st.sampled_from([24, 40, 64]),
    mlp_step=st.sampled_from([1, 4, 8]),
    ratio=st.floats(0.05, 0.6),
    kv=st.one_of(st.none(), st.floats(0.05, 0.5)),
    flops=st.one_of(st.none(), st.floats(0.05, 0.4)),
    tie=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_move_keeps_every_budget_exact(layers, heads, intermediate, mlp_step, ratio, kv, flops, tie, seed):
    q, h = heads
    rng = np.random.default_rng(seed)
    shape = LayerShape(hidden=32, num_q_heads=q, num_kv_heads=h, head_dim=8, intermediate=intermediate, norm_params=64)
    spec = AllocationSpec(ratio=ratio, layers=[shape] * layers, extra_params=4000, mlp_step=mlp_step, tie=tie,
                          attn_importance=rng.random(layers) + 0.1, mlp_importance=rng.random(layers) + 0.1,
                          kv_cache_ratio=kv, flops_ratio=flops)
    try:
        seed_alloc = allocate(spec, "dp")
    except InfeasibleError:
        assume(False)
    ks = build_knapsack(spec)
    parent = choice_for(ks, [a.kv_groups_kept for a in seed_alloc.layers], [a.mlp_kept for a in seed_alloc.layers])
    window = next(w for _, w in windows(ks) if feasible(ks, parent, w))
    for _ in range(30):
        kid = mutate(ks, parent, window, rng, max_moves=3)
        if kid is None:  # a corner with no feasible neighbour is allowed; a wrong offspring is not
            continue
        assert kid != parent
        g, f = widths(spec, ks, kid)
        _budget_ok(spec, seed_alloc, g, f)
        parent = kid


def test_moves_are_found_on_a_real_model_s_problem():
    """SmolLM2's 30 layers at 0.25 with KV-cache and FLOPs bounds too: draws give feasible offspring, moving few
    layers each."""
    from layerprune.models import load_config

    config = load_config("smollm2-135m")
    rng = np.random.default_rng(0)
    spec = spec_from_model_config(config, 0.25, attn_importance=rng.random(30) + 0.1, mlp_importance=rng.random(30) + 0.1,
                                  kv_cache_ratio=0.2, flops_ratio=0.2)
    seed_alloc = allocate(spec, "dp")
    ks = build_knapsack(spec)
    parent = choice_for(ks, [a.kv_groups_kept for a in seed_alloc.layers], [a.mlp_kept for a in seed_alloc.layers])
    window = next(w for _, w in windows(ks) if feasible(ks, parent, w))
    kids = [mutate(ks, parent, window, rng) for _ in range(40)]
    found = [k for k in kids if k is not None]
    assert len(found) >= 36
    for kid in found:
        _budget_ok(spec, seed_alloc, *widths(spec, ks, kid))
        assert 2 <= sum(a != b for a, b in zip(kid, parent)) <= 2 * 3 + 4


def _direct_kl(dense, bank, kv, mlp, ids) -> float:
    """Mean KL per position of the actually pruned model (surgery on the variants' weights, HF's own forward) from
    the dense model, on the whole vocabulary in float64."""
    pruned = copy.deepcopy(dense)
    keep = []
    for l, layer in enumerate(pruned.model.layers):
        with torch.no_grad():
            layer.self_attn.o_proj.weight.copy_(bank.weight(l, "o_proj", kv[l]))
            layer.mlp.down_proj.weight.copy_(bank.weight(l, "down_proj", mlp[l]))
        keep.append(LayerKeep(bank.kept_units(l, "o_proj", kv[l]), bank.kept_units(l, "down_proj", mlp[l])))
    StructuredPruner(pruned).prune(keep)
    assert [len(layer.mlp.down_proj.weight[0]) for layer in pruned.model.layers] == list(mlp)
    with torch.no_grad():
        p = F.log_softmax(dense(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
        q = F.log_softmax(pruned(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)
    return float((p.exp() * (p - q)).sum()) / (ids.shape[0] * (ids.shape[1] - 1))


def _problem(case, ratio=0.3):
    model = make_model(case)
    spec = spec_from_model_config(model.config, ratio, mlp_step=4, attn_importance=np.ones(3), mlp_importance=np.ones(3))
    return model, spec, allocate(spec, "dp"), output_projection_grams(model, token_ids(6, 24, seed=3), progress=False)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=lambda c: c.name)
def test_fitness_is_the_direct_kl_of_the_pruned_model(case):
    model, spec, seed, grams = _problem(case)
    ks = build_knapsack(spec)
    ids = token_ids(3, 16, seed=9)
    bank = VariantBank(model, grams, [{"o_proj": s.num_kv_heads - 1, "down_proj": s.intermediate - 4}
                                      for s in spec.layers])
    fit = FitnessModel(model, bank, ids, top_k=VOCAB)  # every token: the full KL
    before = {n: p.clone() for n, p in model.named_parameters()}
    parent = choice_for(ks, [a.kv_groups_kept for a in seed.layers], [a.mlp_kept for a in seed.layers])
    g, f = widths(spec, ks, parent)
    fit.load({**{(l, "o_proj"): g[l] for l in range(3)}, **{(l, "down_proj"): f[l] for l in range(3)}})
    value, states = fit.kl(0, [fit.hidden0], 3, keep_states=True)
    assert value == pytest.approx(_direct_kl(model_copy(before, model), bank, g, f, ids), rel=1e-4, abs=1e-7)
    assert value > 0
    # an offspring scored from the parent's hidden states (its first changed layer on) equals its direct KL too
    window = next(w for _, w in windows(ks) if w is not None)
    kid = next(k for k in (mutate(ks, parent, window, np.random.default_rng(s)) for s in range(50))
               if k is not None and widths(spec, ks, k)[0][0] == g[0] and widths(spec, ks, k)[1][0] == f[0])
    g2, f2 = widths(spec, ks, kid)
    changed = [l for l in range(3) if (g2[l], f2[l]) != (g[l], f[l])]
    fit.load({**{(l, "o_proj"): g2[l] for l in range(3)}, **{(l, "down_proj"): f2[l] for l in range(3)}})
    from_parent, _ = fit.kl(min(changed), states, 3)
    assert min(changed) > 0
    assert from_parent == pytest.approx(_direct_kl(model_copy(before, model), bank, g2, f2, ids), rel=1e-4, abs=1e-7)
    fit.restore()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def model_copy(weights, model):
    """A copy of ``model`` with ``weights`` (the dense ones) whatever the fitness model has loaded into it."""
    out = copy.deepcopy(model)
    out.load_state_dict(weights, strict=False)
    return out


def test_top_k_fitness_grows_to_the_full_kl_with_k():
    """Top-K plus a tail outcome is a coarsening of the vocabulary, and top-(K+1) refines top-K: the KL can only grow
    with K (the data-processing inequality) and is the full KL at K = V."""
    model, spec, seed, grams = _problem(CASES[0])
    ids = token_ids(3, 16, seed=9)
    bank = VariantBank(model, grams, [{"o_proj": 1, "down_proj": 40} for _ in spec.layers])
    kept = {**{(l, "o_proj"): 1 for l in range(3)}, **{(l, "down_proj"): 40 for l in range(3)}}
    values = []
    for k in (4, 16, 64, 127, VOCAB, 4 * VOCAB):
        fit = FitnessModel(model, bank, ids, top_k=k)  # the dense targets first, then the candidate
        fit.load(kept)
        values.append(fit.kl(0, [fit.hidden0], 3)[0])
        fit.restore()
    assert all(a <= b * (1 + 1e-5) for a, b in zip(values, values[1:]))
    assert values[0] < values[-2]
    assert values[-2] == pytest.approx(values[-1], rel=1e-6)
    assert values[-2] == pytest.approx(_direct_kl(model, bank, [1] * 3, [40] * 3, ids), rel=1e-4)


def test_the_search_never_returns_worse_than_its_seed_and_its_record_is_monotone():
    model, spec, seed, grams = _problem(CASES[0], ratio=0.35)
    ids = token_ids(4, 16, seed=11)
    out = search_allocation(model, spec, seed, grams, ids, SearchSettings(generations=6, offspring=4, samples=4,
                                                                          survivors=2, top_k=VOCAB, seed=1),
                            progress=False)
    assert out.fitness <= out.seed_fitness
    best = [row[2] for row in out.history]
    assert best[0] == out.seed_fitness and best[-1] == out.fitness
    assert all(b <= a for a, b in zip(best, best[1:]))
    generations = len(out.history) - 1
    assert generations == 6 and 1 + 2 * generations <= out.evaluations <= 1 + (4 + 2) * generations
    kv = [a.kv_groups_kept for a in out.allocation.layers]
    mlp = [a.mlp_kept for a in out.allocation.layers]
    _budget_ok(spec, seed, kv, mlp)
    assert out.allocation.params_after == spec.extra_params + sum(s.params(g, f) for s, g, f in zip(spec.layers, kv, mlp))
    seed_removed = [{"o_proj": s.num_kv_heads - a.kv_groups_kept, "down_proj": s.intermediate - a.mlp_kept}
                    for s, a in zip(spec.layers, seed.layers)]
    bank = VariantBank(model, grams, [{"o_proj": s.num_kv_heads - 1, "down_proj": s.intermediate - 4}
                                      for s in spec.layers], seed_removed=seed_removed)
    assert out.fitness == pytest.approx(_direct_kl(model, bank, kv, mlp, ids), rel=1e-4)
    assert json.loads(json.dumps(out.to_json()))["generations"] == len(out.history) - 1


def test_search_settings_are_checked():
    with pytest.raises(InvalidInputError, match="search_screen_samples"):
        SearchSettings(samples=2, screen_samples=3).check()
    with pytest.raises(InvalidInputError, match="search_time"):
        SearchSettings(time_limit=0).check()
    for bad in (dict(mode="uniform", match_params=True), dict(refit="none"), dict(importance="taylor"),
                dict(homogeneous=True)):
        with pytest.raises(InvalidInputError, match="allocation search"):
            resolve_config(PruneConfig(ratio=0.2, allocation="search", **bad))
    with pytest.raises(InvalidInputError, match="allocation search: runs in memory only"):
        resolve_config(PruneConfig(ratio=0.2, allocation="search"), "layers")
    with pytest.raises(InvalidInputError, match="allocation: expected one of"):
        resolve_config(PruneConfig(ratio=0.2, allocation="evolve"))


def test_prune_with_search_from_the_python_api(wikitext_dir):
    from layerprune.pruning import prune
    from layerprune.pruning.pipeline import refit_batch, search_windows

    model = make_model(CASES[0])
    tokenizer = make_tokenizer()
    config = PruneConfig(ratio=0.3, mlp_step=4, calib_samples=4, calib_seq_len=16, refit_samples=6, refit_seq_len=24,
                         fisher_samples=2, data_dir=str(wikitext_dir), allocation="search", search_generations=3,
                         search_offspring=3, search_samples=2)
    held_out, check = search_windows(tokenizer, config)
    refit = refit_batch(tokenizer, config)
    assert held_out.shape == check.shape == (2, 24)
    # rows the refit never read, and check rows the search never read
    assert not any(torch.equal(a, b) for a in torch.cat([held_out, check]) for b in refit)
    assert not any(torch.equal(a, b) for a in held_out for b in check)
    result = prune(model, tokenizer, config, progress=False)
    report = result.report
    assert report["search"]["fitness"] <= report["search"]["seed_fitness"]
    kept = report["search"]["kept"]
    assert report["allocation"]["solver"] == {"search": "search(dp)", "solver": "dp"}[kept]
    assert (report["search"]["final_model_kl"] <= report["search"]["seed_model_kl"]) == (kept == "search")
    assert report["method"] == "unbalanced-reconstruction-dp+search+lstsq+obs"
    assert "search" in report["timings"]


def _search_config(wikitext_dir, **fields):
    base = dict(ratio=0.3, mlp_step=4, calib_samples=4, calib_seq_len=16, refit_samples=6, refit_seq_len=24,
                fisher_samples=2, data_dir=str(wikitext_dir), allocation="search", search_generations=3,
                search_offspring=3, search_samples=2)
    return PruneConfig(**{**base, **fields})


def test_a_search_that_finds_nothing_gives_the_solver_s_model_exactly(wikitext_dir):
    from layerprune.pruning import prune

    model = make_model(CASES[0])
    tokenizer = make_tokenizer()
    searched = prune(model, tokenizer, _search_config(wikitext_dir, search_generations=0), progress=False)
    solved = prune(model, tokenizer, _search_config(wikitext_dir, allocation="solve"), progress=False)
    assert searched.report["search"]["accepted"] == 0 and searched.report["search"]["kept"] == "search"
    assert searched.report["search"]["final_model_kl"] == searched.report["search"]["seed_model_kl"]
    assert searched.allocation.to_json()["layers"] == solved.allocation.to_json()["layers"]
    for (name, a), (_, b) in zip(searched.model.named_parameters(), solved.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # the seed's fitness is its refit model's KL: the variants are refit on the Grams its refit collected
    from layerprune.pruning.pipeline import search_windows
    from layerprune.pruning.search import FitnessModel

    held_out, check = search_windows(tokenizer, _search_config(wikitext_dir))
    s = searched.report["search"]
    assert s["seed_fitness"] == pytest.approx(FitnessModel(model, None, held_out, 512).score(solved.model), rel=1e-4)
    assert s["seed_model_kl"] == pytest.approx(FitnessModel(model, None, check, 512).score(solved.model), rel=1e-4)


def test_searched_widths_whose_refit_model_scores_worse_give_way_to_the_solver_s(wikitext_dir, monkeypatch):
    from layerprune.pruning import prune
    from layerprune.pruning import search as search_module

    model = make_model(CASES[0])
    tokenizer = make_tokenizer()
    solved = prune(model, tokenizer, _search_config(wikitext_dir, allocation="solve"), progress=False)
    real = search_module.FitnessModel.score
    calls = []

    def score(self, other):  # the solver's refit model first, then the searched widths' (made to look worse)
        calls.append(real(self, other))
        return calls[-1] + (1.0 if len(calls) == 2 else 0.0)

    monkeypatch.setattr(search_module.FitnessModel, "score", score)
    searched = prune(model, tokenizer, _search_config(wikitext_dir, search_generations=8, search_offspring=6),
                     progress=False)
    s = searched.report["search"]
    assert s["accepted"] > 0 and len(calls) == 2
    assert s["kept"] == "solver"
    assert searched.allocation.to_json()["layers"] == solved.allocation.to_json()["layers"]
    for (name, a), (_, b) in zip(searched.model.named_parameters(), solved.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
