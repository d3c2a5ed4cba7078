"""Allocation curves without pruned evaluations: the Fisher of the residual stream against autograd at each
projection's output, the reconstruction curves against brute-force refits, and the depth schedule's rates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from families import CASES, make_model, token_ids, plain_config
from test_obs import _brute

from layerprune.arch import gqa, layer_shapes
from layerprune.importance import depth_importance, reconstruction_importance
from layerprune.importance.depth import depth_weight
from layerprune.importance.reconstruction import grams_and_fisher
from layerprune.pruning import prune
from layerprune.refit import output_projection_grams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _autograd_fisher(model, ids):
    """Per layer the squared gradients of the summed loss at o_proj's and down_proj's outputs, summed over tokens."""
    outputs = []
    hooks = [linear.register_forward_hook(lambda m, a, o: outputs.append(o))
             for layer in model.model.layers for linear in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    out = model(input_ids=ids, labels=ids, use_cache=False)
    for h in hooks:
        h.remove()
    n = ids.shape[0] * (ids.shape[1] - 1)
    grads = torch.autograd.grad(out.loss * n, outputs)
    sums = [g.double().pow(2).sum((0, 1)) for g in grads]
    return [{"o_proj": sums[2 * l], "down_proj": sums[2 * l + 1]} for l in range(len(sums) // 2)], n, float(out.loss.detach())


@pytest.mark.parametrize("fisher_samples", [None, 2, 3])
def test_fisher_matches_autograd_at_each_projection_output(fisher_samples):
    model = make_model(CASES[0])
    ids = token_ids(batch=5, length=12, seed=2)
    grams, fisher, loss = grams_and_fisher(model, ids, micro_batch=2, fisher_samples=fisher_samples, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # restored
    reference, n, ref_loss = _autograd_fisher(model, ids[:fisher_samples])
    for l, layer_fisher in enumerate(fisher):
        for name in ("o_proj", "down_proj"):
            torch.testing.assert_close(layer_fisher[name], reference[l][name] / n, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(fisher[0]["o_proj"], fisher[0]["down_proj"])  # two places of the residual stream
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    dense = output_projection_grams(model, ids, micro_batch=5, progress=False)  # Grams over every sequence
    for l in range(len(grams)):
        for name in ("o_proj", "down_proj"):
            assert grams[l][name].count == ids.numel()
            torch.testing.assert_close(grams[l][name].gram, dense[l][name].gram, rtol=1e-5, atol=1e-6)


def test_fisher_samples_out_of_range_is_refused():
    from layerprune.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="fisher_samples"):
        grams_and_fisher(make_model(CASES[0]), token_ids(batch=2, length=8, seed=0), fisher_samples=0, progress=False)


def test_reconstruction_curves_are_half_the_fisher_weighted_refit_error():
    model = make_model(CASES[0])
    ids = token_ids(batch=6, length=16, seed=4)
    gf = grams_and_fisher(model, ids, progress=False)
    li = reconstruction_importance(model, ids, grams_fisher=gf, progress=False, batch_fraction=1.0)
    grams, fisher, _ = gf
    shapes = layer_shapes(model)
    for l, s in enumerate(shapes):
        h, ratio, hd = s["num_kv_heads"], s["num_q_heads"] // s["num_kv_heads"], s["head_dim"]
        w = model.model.layers[l].self_attn.o_proj.weight.detach().double()
        one_removed = min(_brute(w, grams[l]["o_proj"], gqa.q_rows([j], ratio, hd), 0.01, fisher[l]["o_proj"])[0]
                          for j in range(h))
        assert li.attn_curves[l][h] == 0.0
        assert li.attn_curves[l][h - 1] == pytest.approx(0.5 * one_removed, rel=1e-6)
        assert np.all(np.diff(li.attn_curves[l][1:]) <= 1e-15) and np.all(np.diff(li.mlp_curves[l]) <= 1e-15)
        wd = model.model.layers[l].mlp.down_proj.weight.detach().double()
        assert li.mlp_curves[l][0] == pytest.approx(0.5 * _brute(wd, grams[l]["down_proj"],
                                                                 list(range(s["intermediate"])), 0.01,
                                                                 fisher[l]["down_proj"])[0])


def test_depth_schedule_rates_rise_like_the_log_of_depth():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=2, vocab_size=512)
    model = LlamaForCausalLM(cfg)
    li = depth_importance(model)
    result = prune(model, None, plain_config(ratio=0.3, layer_importance="depth", importance="l1"),
                   calib_ids=token_ids(2, 8, 0), progress=False, layer_importance=li)
    rates = np.array([1 - a.mlp_kept / 1024 for a in result.allocation.layers])
    attn = np.array([1 - a.kv_groups_kept / 32 for a in result.allocation.layers])
    weights = np.array([depth_weight(l) for l in range(8)])
    assert np.all(np.diff(rates) >= 0) and np.all(np.diff(attn) >= -1 / 32)
    np.testing.assert_allclose(rates / rates.mean(), weights / weights.mean(), atol=0.01)
    np.testing.assert_allclose(attn / attn.mean(), weights / weights.mean(), atol=0.1)
    assert math.isclose(result.report["actual_ratio"], 0.3, abs_tol=2e-3)
