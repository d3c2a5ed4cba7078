"""Layer importance from cached states against brute force on tiny random Llamas."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from layerprune.errors import InvalidInputError, ModelError
from layerprune.arch import adapter_for
from layerprune.importance import (
    activation_importance,
    capture_layer_inputs,
    layer_importance,
    removal_importance,
    sensitivity_importance,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Identity(torch.nn.Module):
    """Stands in for a deleted decoder layer (accepts the layer's call signature)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Zero(torch.nn.Module):
    def forward(self, *args, **kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        return torch.zeros_like(x), None


class _ZeroMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _ids(vocab=128, n=3, seq=12, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def test_layer_forward_matches_the_library_layer():
    model = make_tiny_llama()
    ids = _ids()
    cache = capture_layer_inputs(model, ids, progress=False)
    for l, layer in enumerate(model.model.layers):
        with torch.no_grad():
            ours = adapter_for(model).layer_forward(layer, cache.hidden[l], cache.layer_kwargs[l])
        torch.testing.assert_close(ours, cache.hidden[l + 1], rtol=1e-5, atol=1e-5)
    assert cache.base_loss == pytest.approx(_loss(model, ids), rel=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_removal_equals_brute_force(attn_impl):
    model = make_tiny_llama(layers=4)
    model.config._attn_implementation = attn_impl
    ids = _ids()
    base = _loss(model, ids)
    imp = removal_importance(model, ids, progress=False)
    for l in range(4):
        full = copy.deepcopy(model)
        full.model.layers[l] = _Identity()
        no_attn = copy.deepcopy(model)
        no_attn.model.layers[l].self_attn = _Zero()
        no_mlp = copy.deepcopy(model)
        no_mlp.model.layers[l].mlp = _ZeroMLP()
        assert imp.combined[l] == pytest.approx(_loss(full, ids) - base, abs=1e-5)
        assert imp.attn[l] == pytest.approx(_loss(no_attn, ids) - base, abs=1e-5)
        assert imp.mlp[l] == pytest.approx(_loss(no_mlp, ids) - base, abs=1e-5)
    assert np.all(np.abs(imp.combined) > 1e-4)  # not vacuous: removing a layer changes the loss
    ppl = removal_importance(model, ids, metric="ppl", progress=False, sub_blocks=False)
    assert ppl.combined[0] == pytest.approx(np.exp(base + imp.combined[0]) - np.exp(base), rel=1e-4)


def test_block_influence_equals_direct_computation():
    model = make_tiny_llama(layers=3)
    ids = _ids()
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    imp = activation_importance(model, ids, progress=False)
    cache = capture_layer_inputs(model, ids, progress=False)
    for l in range(3):
        x = states[l].reshape(-1, states[l].shape[-1])
        # hidden_states[L] is after the final norm in HF; use the cached pre-norm state for the last layer.
        y = (states[l + 1] if l + 1 < 3 else cache.hidden[3]).reshape(-1, x.shape[-1])
        direct = 1.0 - float(torch.mean(torch.sum(x * y, -1) / (x.norm(dim=-1) * y.norm(dim=-1))))
        assert imp.combined[l] == pytest.approx(direct, abs=1e-5)
        with torch.no_grad():
            mid = cache.hidden[l] + adapter_for(model).attention_block(model.model.layers[l], cache.hidden[l], cache.layer_kwargs[l])
        xm = mid.reshape(-1, x.shape[-1])
        assert imp.attn[l] == pytest.approx(1 - float(torch.nn.functional.cosine_similarity(x, xm).mean()), abs=1e-5)
        assert imp.mlp[l] == pytest.approx(1 - float(torch.nn.functional.cosine_similarity(xm, y).mean()), abs=1e-5)


def _slice_layer(model, l, kv_keep, ch_keep, head_dim):
    """Brute force: physically cut KV groups / channels from layer l of a copy (GQA fold by hand)."""
    pruned = copy.deepcopy(model)
    attn, mlp = pruned.model.layers[l].self_attn, pruned.model.layers[l].mlp
    r = attn.q_proj.out_features // attn.k_proj.out_features
    kv_rows = [j * head_dim + d for j in kv_keep for d in range(head_dim)]
    q_rows = [h * head_dim + d for j in kv_keep for h in range(r * j, r * j + r) for d in range(head_dim)]
    with torch.no_grad():
        for lin, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            lin.weight = torch.nn.Parameter(lin.weight[rows].clone())
            lin.out_features = len(rows)
        attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, q_rows].clone())
        attn.o_proj.in_features = len(q_rows)
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight = torch.nn.Parameter(lin.weight[list(ch_keep)].clone())
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, list(ch_keep)].clone())
    return pruned


@pytest.mark.parametrize("heads,kv", [(8, 2), (9, 3), (4, 4)])
def test_sensitivity_points_equal_brute_force(heads, kv):
    head_dim, inter = 8, 16
    model = make_tiny_llama(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, hidden=4 * heads, intermediate=inter, layers=3)
    ids = _ids()
    gen = torch.Generator().manual_seed(3)
    kv_scores = [torch.rand(kv, generator=gen) for _ in range(3)]
    ch_scores = [torch.rand(inter, generator=gen) for _ in range(3)]
    imp = sensitivity_importance(model, ids, kv_scores, ch_scores, min_kv_groups=0, progress=False)
    base = _loss(model, ids)
    removal = removal_importance(model, ids, progress=False)
    for l in range(3):
        a, m = imp.attn_curves[l], imp.mlp_curves[l]
        assert a.shape == (kv + 1,) and m.shape == (inter + 1,)
        assert a[kv] == 0.0 and m[inter] == 0.0  # full keep costs nothing
        assert np.all(np.diff(a) <= 0) and np.all(np.diff(m) <= 0)
        # 0 kept = sub-block removed (clipped at 0 like the curve).
        raw = imp.details["mlp_samples"][l]
        assert imp.details["attn_samples"][l]["0"] == pytest.approx(removal.attn[l], abs=1e-5)
        assert raw["0"] == pytest.approx(removal.mlp[l], abs=1e-5)
        assert a[0] >= max(removal.attn[l], 0.0) - 1e-6 and m[0] >= max(removal.mlp[l], 0.0) - 1e-6
        for point in (1, kv - 1):
            if 0 < point < kv:
                order = torch.argsort(-kv_scores[l], stable=True)[:point].sort().values.tolist()
                truth = _loss(_slice_layer(model, l, order, list(range(inter)), head_dim), ids) - base
                assert imp.details["attn_samples"][l][str(point)] == pytest.approx(truth, abs=1e-5)
        c = 8  # a sampled MLP point (0.5 * 16)
        keep = torch.argsort(-ch_scores[l], stable=True)[:c].sort().values.tolist()
        truth = _loss(_slice_layer(model, l, list(range(kv)), keep, head_dim), ids) - base
        assert raw[str(c)] == pytest.approx(truth, abs=1e-5)
        assert m[c] >= max(truth, 0.0) - 1e-6  # the monotone repair only raises a sampled value


def test_sensitivity_interpolates_between_points():
    model = make_tiny_llama(intermediate=40, layers=2)
    ids = _ids()
    ch = [torch.arange(40, dtype=torch.float32)] * 2
    kv = [torch.tensor([1.0, 2.0])] * 2
    imp = sensitivity_importance(model, ids, kv, ch, mlp_step=4, progress=False)
    for l in range(2):
        s = {int(k): v for k, v in imp.details["mlp_samples"][l].items()}
        assert sorted(s) == [0, 12, 20, 32, 40]
        curve = imp.mlp_curves[l]
        assert curve.shape == (11,)  # kept = 0, 4, ..., 40
        raw = np.interp(np.arange(11) * 4, sorted(s), [s[k] for k in sorted(s)])
        mono = np.maximum(np.maximum.accumulate(raw[::-1])[::-1], 0)
        np.testing.assert_allclose(curve, mono)
        assert imp.attn_curves[l][0] == imp.attn_curves[l][1]  # g=0 not sampled with min_kv_groups=1


def test_bad_inputs():
    model = make_tiny_llama(layers=2)
    with pytest.raises(InvalidInputError, match="layer_importance"):
        layer_importance(model, _ids(), method="bogus")
    with pytest.raises(InvalidInputError, match="calib_ids"):
        layer_importance(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ModelError):
        layer_importance(torch.nn.Linear(2, 2), _ids())
    with pytest.raises(InvalidInputError, match="metric"):
        removal_importance(model, _ids(), metric="acc")


def test_to_json_roundtrips_through_json():
    import json

    model = make_tiny_llama(layers=2)
    imp = layer_importance(model, _ids(), "removal", progress=False)
    data = json.loads(json.dumps(imp.to_json()))
    assert data["method"] == "removal" and len(data["combined"]) == 2


def test_curve_samples_equal_curves_on_the_first_sequences():
    model = make_tiny_llama(layers=2, intermediate=16)
    ids = _ids(n=4)
    kv = [torch.tensor([2.0, 1.0])] * 2
    ch = [torch.arange(16, dtype=torch.float32)] * 2
    sub = sensitivity_importance(model, ids, kv, ch, curve_samples=2, progress=False)
    direct = sensitivity_importance(model, ids[:2], kv, ch, progress=False)
    assert sub.base_loss == pytest.approx(direct.base_loss, abs=1e-6)
    for a, b in zip(sub.mlp_curves + sub.attn_curves, direct.mlp_curves + direct.attn_curves):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(InvalidInputError, match="curve_samples"):
        sensitivity_importance(model, ids, kv, ch, curve_samples=0, progress=False)
