"""`layerprune.allocation.to_pruning_ratio_dict` and its inverse: a plan as a Torch-Pruning rate dictionary.

A rate must land on the planned count under Torch-Pruning's arithmetic (``int(n * (1 - rate))`` rows of the root,
whole KV heads), also where floating point puts ``n * (1 - (n - k) / n)`` just under ``k``; and a dictionary
resolves like Torch-Pruning's (a key covers every projection inside it, later keys win, coupled projections share
one rate).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_tiny_llama
from families import CASE_IDS, CASES, make_model

from layerprune.allocation import allocate, from_pruning_ratio_dict, spec_from_model_config, to_pruning_ratio_dict
from layerprune.allocation.ratio_dict import ATTENTION, MLP, Structure, kept_units, structure_rates
from layerprune.errors import InvalidInputError
from layerprune.models import count_parameters


def _plan(layers):
    return SimpleNamespace(layers=[SimpleNamespace(kv_groups_kept=g, mlp_kept=f) for g, f in layers])


def test_every_count_of_a_wide_mlp_and_many_kv_heads_round_trips():
    """1,536 channels (SmolLM2) and 8 KV heads of 128 rows (Llama 3): every kept count, through the rate and back."""
    model = make_tiny_llama(num_heads=16, num_kv_heads=8, head_dim=128, hidden=16, intermediate=1536, layers=1, vocab=8)
    misses = []
    for kept in range(1, 1537):
        groups = 1 + kept % 8
        rates = to_pruning_ratio_dict(model, _plan([(groups, kept)]))
        layer = model.model.layers[0]
        mlp_rate, attn_rate = rates[layer.mlp.gate_proj], rates[layer.self_attn.k_proj]
        if kept_units(1536, 1, mlp_rate) != kept or kept_units(8, 128, attn_rate) != groups:
            misses.append(kept)
    assert misses == []
    # the plain fraction is used whenever it lands, so typical rates stay readable
    rates = to_pruning_ratio_dict(model, _plan([(6, 1152)]))
    assert rates[model.model.layers[0].mlp.gate_proj] == 0.25 and rates[model.model.layers[0].self_attn.k_proj] == 0.25


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_an_allocation_round_trips_with_exact_parameter_counts(case):
    model = make_model(case)
    spec = spec_from_model_config(model.config, 0.35, attn_importance=np.array([3.0, 1.0, 2.0]),
                                  mlp_importance=np.array([1.0, 2.5, 0.5]))
    allocation = allocate(spec, solver="dp")
    rates = to_pruning_ratio_dict(model, allocation)
    plan = from_pruning_ratio_dict(model, rates)
    assert [(a.kv_groups_kept, a.q_heads_kept, a.mlp_kept, a.params_kept) for a in plan.layers] == \
        [(a.kv_groups_kept, a.q_heads_kept, a.mlp_kept, a.params_kept) for a in allocation.layers]
    assert (plan.params_before, plan.params_after) == (allocation.params_before, allocation.params_after)
    assert plan.params_before == count_parameters(model)["total"]
    assert plan.actual_ratio == pytest.approx(allocation.actual_ratio)
    assert plan.actual_ratio_layers == pytest.approx(allocation.actual_ratio_layers)


def test_keys_cover_their_projections_and_later_keys_win():
    model = make_tiny_llama(num_heads=8, num_kv_heads=4, head_dim=8, hidden=32, intermediate=64, layers=3)
    layers = model.model.layers
    rates = structure_rates(model, {model: 0.5, layers[1]: 0.25, layers[1].mlp: 0.125,
                                    (layers[2].self_attn,): 0.0}, pruning_ratio=0.75)
    assert rates[Structure(0, ATTENTION)] == (0.5, 0) and rates[Structure(0, MLP)] == (0.5, 0)
    assert rates[Structure(1, ATTENTION)] == (0.25, 1) and rates[Structure(1, MLP)] == (0.125, 2)
    assert rates[Structure(2, ATTENTION)] == (0.0, 3) and rates[Structure(2, MLP)] == (0.5, 0)
    assert structure_rates(model, None, 0.75)[Structure(2, MLP)] == (0.75, None)
    plan = from_pruning_ratio_dict(model, {layers[0].self_attn.q_proj: 0.5, layers[2].mlp: 0.3})
    assert [(a.kv_groups_kept, a.mlp_kept) for a in plan.layers] == [(2, 64), (4, 64), (4, 44)]


@pytest.mark.parametrize("rates, message", [
    ("q_and_k", "must share one rate"),
    ("o_proj", "hidden size"),
    ("stranger", "not a module of this model"),
    ("not_a_module", "keys must be modules"),
    ("one", "pruning rate must be a number in [0, 1)"),
    ("everything", "removes every KV group"),
])
def test_bad_dictionaries_are_one_error_line(rates, message):
    model = make_tiny_llama(num_heads=8, num_kv_heads=4, head_dim=8, hidden=32, intermediate=64, layers=2)
    attn = model.model.layers[0].self_attn
    bad = {
        "q_and_k": {attn.q_proj: 0.5, attn.k_proj: 0.25},
        "o_proj": {attn.o_proj: 0.5},
        "stranger": {make_tiny_llama(layers=1).model.layers[0]: 0.5},
        "not_a_module": {"model.layers.0": 0.5},
        "one": {attn: 1.0},
        "everything": {attn: 0.99},
    }[rates]
    with pytest.raises(InvalidInputError) as info:
        from_pruning_ratio_dict(model, bad)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith("pruning_ratio_dict")


def test_plans_that_do_not_fit_the_model_are_refused():
    model = make_tiny_llama(num_heads=8, num_kv_heads=4, head_dim=8, hidden=32, intermediate=64, layers=2)
    with pytest.raises(InvalidInputError, match="allocation: has 1 layers, the model has 2"):
        to_pruning_ratio_dict(model, _plan([(1, 1)]))
    with pytest.raises(InvalidInputError, match=r"allocation.layers\[1\].kv_groups_kept: 5 is not in 1..4"):
        to_pruning_ratio_dict(model, _plan([(1, 1), (5, 3)]))
    with pytest.raises(InvalidInputError, match=r"allocation.layers\[0\].mlp_kept: 0 is not in 1..64"):
        to_pruning_ratio_dict(model, _plan([(1, 0), (1, 1)]))
    with pytest.raises(InvalidInputError, match="expected an AllocationResult"):
        to_pruning_ratio_dict(model, [1, 2])

