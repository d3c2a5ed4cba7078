"""Our Torch-Pruning importances return the same group scores as TP 1.6.1's own, on a tiny Llama."""

from __future__ import annotations

import functools

import pytest
import torch
import torch_pruning as tp
from conftest import make_tiny_llama

from layerprune.scoring import GradientScorer
from layerprune.torch_pruning.kernel_importance import ActivationStatsImportance as ActivationImportance
from layerprune.torch_pruning.kernel_importance import KernelMagnitudeImportance as MagnitudeImportance
from layerprune.torch_pruning.kernel_importance import KernelTaylorImportance as TaylorImportance


@functools.cache
def _with_grads(seed=0, kv_heads=2):
    """Model + graph with gradients from one backward, shared by the read-only comparisons."""
    model, ids, dg = _setup(seed, kv_heads)
    model(ids, labels=ids).loss.backward()
    return model, ids, dg


def _setup(seed=0, kv_heads=2):
    model = make_tiny_llama(layers=2, seed=seed, num_kv_heads=kv_heads)
    model.config.use_cache = False
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=ids, output_transform=lambda out: out.logits.sum())
    return model, ids, dg


def _groups(model, dg):
    layer = model.model.layers[1]
    roots = [
        (layer.mlp.gate_proj, tp.prune_linear_out_channels, layer.mlp.gate_proj.out_features),
        (layer.mlp.down_proj, tp.prune_linear_in_channels, layer.mlp.down_proj.in_features),
        (layer.self_attn.k_proj, tp.prune_linear_out_channels, layer.self_attn.k_proj.out_features),
        (model.model.embed_tokens, tp.prune_embedding_out_channels, 48),  # the whole hidden dim group
    ]
    if model.config.num_key_value_heads == model.config.num_attention_heads:
        # with GQA, TP's plain graph couples o_proj/q_proj (64) to k/v (16) and TP itself fails
        roots += [
            (layer.self_attn.o_proj, tp.prune_linear_in_channels, layer.self_attn.o_proj.in_features),
            (model.model.layers[0].self_attn.q_proj, tp.prune_linear_out_channels, 64),
        ]
    # TP's _reduce scatters by root index into a vector as long as the first term: it needs
    # idxs = range(n) (what TP's pruners pass), so groups are built over all channels.
    return [dg.get_pruning_group(module, fn, idxs=list(range(n))) for module, fn, n in roots]


def _same(ours, theirs, ctx):
    assert theirs is not None, f"{ctx}: TP scored nothing (test would be vacuous)"
    assert ours is not None, ctx
    if ours is not None:
        # float32 sums in another order; vectorize (multivariable) can cancel, so atol scales with the largest score
        atol = 1e-6 * float(theirs.abs().max()) + 1e-9
        err = (ours.float() - theirs.float()).abs()
        assert bool((err <= atol + 1e-5 * theirs.abs()).all()), f"{ctx}: max err {err.max().item():.3g}"


@pytest.mark.parametrize("reduction", ["mean", "max", "first"])
@pytest.mark.parametrize("normalizer", ["mean", None])
@pytest.mark.parametrize("multivariable", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 8])
def test_taylor_matches_torch_pruning(reduction, normalizer, multivariable, kv_heads):
    model, _, dg = _with_grads(kv_heads=kv_heads)
    ours = TaylorImportance(group_reduction=reduction, normalizer=normalizer, multivariable=multivariable)
    theirs = tp.importance.GroupTaylorImportance(group_reduction=reduction, normalizer=normalizer, multivariable=multivariable)
    for k, group in enumerate(_groups(model, dg)):
        _same(ours(group), theirs(group), f"group {k}")


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["sum", "prod"])
@pytest.mark.parametrize("normalizer", ["mean", None])
@pytest.mark.parametrize("kv_heads", [2, 8])
def test_magnitude_matches_torch_pruning(p, reduction, normalizer, kv_heads):
    model, _, dg = _with_grads(kv_heads=kv_heads)
    ours = MagnitudeImportance(p=p, group_reduction=reduction, normalizer=normalizer)
    theirs = tp.importance.GroupMagnitudeImportance(p=p, group_reduction=reduction, normalizer=normalizer)
    for k, group in enumerate(_groups(model, dg)):
        _same(ours(group), theirs(group), f"group {k}")


def test_taylor_from_scorer_without_kept_gradients():
    model, ids, dg = _setup(seed=2)
    ref, _, _ = _setup(seed=2)
    ref(ids, labels=ids).loss.backward()
    with GradientScorer(model, module_filter=lambda n, m: isinstance(m, torch.nn.Linear)) as scorer:
        model(ids, labels=ids).loss.backward()
    assert model.model.layers[1].mlp.up_proj.weight.grad is None
    ours = TaylorImportance(scorer=scorer)
    theirs = tp.importance.GroupTaylorImportance()
    ref_dg = tp.DependencyGraph().build_dependency(ref, example_inputs=ids, output_transform=lambda out: out.logits.sum())
    for k, (g_ours, g_ref) in enumerate(zip(_groups(model, dg), _groups(ref, ref_dg), strict=True)):
        _same(ours(g_ours), theirs(g_ref), f"group {k}")


@pytest.mark.parametrize("metric", ["wanda", "flap"])
def test_activation_importance(metric):
    model, ids, dg = _setup(seed=3)
    imp = ActivationImportance(metric=metric, group_reduction="sum", normalizer=None)
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, name=n: inputs.__setitem__(name, a[0].detach().reshape(-1, a[0].shape[-1])))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with imp.collect(model), torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    down = model.model.layers[1].mlp.down_proj
    group = dg.get_pruning_group(down, tp.prune_linear_in_channels, idxs=list(range(down.in_features)))
    x = inputs["model.layers.1.mlp.down_proj"].double()
    w = down.weight.double()
    want = x.norm(dim=0) * w.abs().sum(0) if metric == "wanda" else x.var(0, unbiased=False) * w.square().sum(0)
    torch.testing.assert_close(imp(group).double(), want, rtol=1e-4, atol=1e-8)
