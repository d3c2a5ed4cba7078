"""KV-group / channel folding of element scores, checked by hand on tiny random Llamas."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_tiny_llama
from layerprune.errors import InvalidInputError, NumericalError
from layerprune.scoring.groups import element_group_scores, fold_attention_scores, fold_mlp_scores


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(vocab=128, n=3, seq=10, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _hand_fold(q, k, v, o, heads, kv, d):
    """KV group j = q heads r*j..r*j+r-1 + k head j + v head j + o heads r*j..r*j+r-1, by loops."""
    r = heads // kv
    out = []
    for j in range(kv):
        total = 0.0
        for h in range(r * j, r * j + r):
            total += float(q[h * d : (h + 1) * d].sum()) + float(o[h * d : (h + 1) * d].sum())
        total += float(k[j * d : (j + 1) * d].sum()) + float(v[j * d : (j + 1) * d].sum())
        out.append(total)
    return torch.tensor(out)


@pytest.mark.parametrize("heads,kv", [(8, 2), (9, 3), (4, 4)])
def test_fold_is_grouped_by_consecutive_query_heads(heads, kv):
    d = 3
    gen = torch.Generator().manual_seed(heads)
    q, o = torch.rand(heads * d, generator=gen), torch.rand(heads * d, generator=gen)
    k, v = torch.rand(kv * d, generator=gen), torch.rand(kv * d, generator=gen)
    got = fold_attention_scores(q, k, v, o, heads, kv, d)
    torch.testing.assert_close(got, _hand_fold(q, k, v, o, heads, kv, d))
    if heads // kv > 1:
        # The interleaved assignment (head h -> group h % Hkv) gives a different answer here.
        q_one = torch.zeros(heads * d)
        q_one[1 * d : 2 * d] = 1.0  # query head 1 belongs to group 0 when r > 1
        z = torch.zeros(kv * d)
        folded = fold_attention_scores(q_one, z, z, torch.zeros(heads * d), heads, kv, d)
        assert folded[0] == d and folded.sum() == d


def test_fold_rejects_bad_lengths():
    with pytest.raises(InvalidInputError, match="q_rows"):
        fold_attention_scores(torch.ones(5), torch.ones(4), torch.ones(4), torch.ones(8), 2, 1, 4)
    with pytest.raises(InvalidInputError, match="MLP"):
        fold_mlp_scores(torch.ones(3), torch.ones(3), torch.ones(4))


def _hand_taylor(model, ids, per_sample_kind=None):
    """Plain torch: |W*G| (one backward on the batch) or LLM-Pruner's per-sample Fisher scores."""
    m = copy.deepcopy(model)
    weights = {n: p for n, p in m.named_parameters() if "layers" in n and n.endswith("proj.weight")}
    if per_sample_kind is None:
        m(input_ids=ids, labels=ids).loss.backward()
        elem = {n: (p.detach() * p.grad).abs() for n, p in weights.items()}
    else:
        gs = {n: torch.zeros_like(p) for n, p in weights.items()}
        hs = {n: torch.zeros_like(p) for n, p in weights.items()}
        for s in range(ids.shape[0]):
            m.zero_grad()
            m(input_ids=ids[s : s + 1], labels=ids[s : s + 1]).loss.backward()
            for n, p in weights.items():
                gs[n] += p.grad / ids.shape[0]
                hs[n] += p.grad**2 / ids.shape[0]
        elem = {}
        for n, p in weights.items():
            w = p.detach()
            second = w * hs[n] * w
            elem[n] = second.abs() if per_sample_kind == "taylor2" else (w * gs[n] - 0.5 * second).abs()
    return elem


@pytest.mark.parametrize("kind", ["taylor", "taylor2", "taylor-mix"])
@pytest.mark.parametrize("heads,kv", [(8, 2), (6, 3)])
def test_gradient_group_scores_match_hand_computation(kind, heads, kv):
    d = 6
    model = make_tiny_llama(num_heads=heads, num_kv_heads=kv, head_dim=d, hidden=heads * d, intermediate=20, layers=2)
    ids = _ids()
    kv_scores, ch_scores = element_group_scores(model, ids, importance=kind, progress=False)
    elem = _hand_taylor(model, ids, None if kind == "taylor" else kind)
    for l in range(2):
        p = f"model.layers.{l}"
        row = lambda n: elem[f"{p}.{n}.weight"].sum(1)  # noqa: E731
        col = lambda n: elem[f"{p}.{n}.weight"].sum(0)  # noqa: E731
        want = _hand_fold(row("self_attn.q_proj"), row("self_attn.k_proj"), row("self_attn.v_proj"),
                          col("self_attn.o_proj"), heads, kv, d)
        torch.testing.assert_close(kv_scores[l], want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ch_scores[l], row("mlp.gate_proj") + row("mlp.up_proj") + col("mlp.down_proj"),
                                   rtol=1e-4, atol=1e-7)
        assert kv_scores[l].shape == (kv,) and ch_scores[l].shape == (20,)


def test_activation_scores_are_wanda_by_hand():
    model = make_tiny_llama(num_heads=4, num_kv_heads=2, head_dim=4, hidden=16, intermediate=12, layers=2)
    ids = _ids()
    inputs = {}

    def record(name):
        def hook(module, args):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])

        return hook

    handles = [mod.register_forward_pre_hook(record(n))
               for n, mod in model.named_modules() if n.endswith("proj") and "layers" in n]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    kv_scores, ch_scores = element_group_scores(model, ids, importance="activation", progress=False)
    mods = dict(model.named_modules())
    for l in range(2):
        p = f"model.layers.{l}"

        def row(n):
            return (mods[f"{p}.{n}"].weight.abs() * inputs[f"{p}.{n}"].norm(dim=0)).sum(1).detach()

        def col(n):
            return (mods[f"{p}.{n}"].weight.abs().sum(0) * inputs[f"{p}.{n}"].norm(dim=0)).detach()

        want = _hand_fold(row("self_attn.q_proj"), row("self_attn.k_proj"), row("self_attn.v_proj"),
                          col("self_attn.o_proj"), 4, 2, 4)
        torch.testing.assert_close(kv_scores[l], want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ch_scores[l], row("mlp.gate_proj") + row("mlp.up_proj") + col("mlp.down_proj"),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_magnitude_scores_need_no_data(kind):
    model = make_tiny_llama(num_heads=4, num_kv_heads=1, head_dim=4, hidden=16, intermediate=12, layers=1)
    kv_scores, ch_scores = element_group_scores(model, None, importance=kind, progress=False)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    e = (lambda w: w.abs()) if kind == "l1" else (lambda w: w * w)
    want = sum(float(e(x.weight.detach()).sum()) for x in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    assert float(kv_scores[0][0]) == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(ch_scores[0], (e(mlp.gate_proj.weight).sum(1) + e(mlp.up_proj.weight).sum(1)
                                              + e(mlp.down_proj.weight).sum(0)).detach())


def test_model_is_left_untouched():
    model = make_tiny_llama(layers=2)
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    element_group_scores(model, _ids(), importance="taylor", progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].self_attn.q_proj.weight.requires_grad


def test_non_finite_gradients_raise_with_layer_name():
    model = make_tiny_llama(layers=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.up_proj"):
        element_group_scores(model, _ids(), importance="taylor", progress=False)
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.up_proj"):
        element_group_scores(model, None, importance="l1", progress=False)


def test_bad_importance_and_missing_data():
    model = make_tiny_llama(layers=1)
    with pytest.raises(InvalidInputError, match="importance"):
        element_group_scores(model, _ids(), importance="random")
    with pytest.raises(InvalidInputError, match="calib_ids"):
        element_group_scores(model, None, importance="taylor")
