"""The least-squares refit of the kept weights: against torch.linalg.lstsq, never worse than no refit,
exact bias compensation, and refit models that prune, save and reload with the same logits in every family."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from families import CASE_IDS, CASES, logits, make_model, token_ids, plain_config
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.arch import OUTPUT_BIAS_KEY, layer_shapes
from layerprune.export import save_pruned
from layerprune.models import count_parameters, load_pruned
from layerprune.pruning import masked_dense_forward, prune, pruned_copy
from layerprune.pruning.refit_loop import refit_kept_weights
from layerprune.refit import InputGram, compensation_bias, reconstruction_error, refit_output_projection
from layerprune.refit.lstsq import add_symmetric_gram_, damping_added
from layerprune.scoring.selection import LayerKeep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), features=st.integers(1, 70), block=st.integers(1, 32), seed=st.integers(0, 10_000))
def test_symmetric_gram_adds_the_full_product(rows, features, block, seed):
    x = torch.randn(rows, features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    start = torch.randn(features, features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    got = add_symmetric_gram_(start.clone(), x, block)
    torch.testing.assert_close(got, start + x.T @ x, rtol=1e-12, atol=1e-12)


def _stats(x: torch.Tensor, chunks: int = 3) -> InputGram:
    stats = InputGram.empty(x.shape[1])
    for part in x.chunk(chunks):
        stats.update(part)
    return stats



@pytest.mark.parametrize("affine", [False, True])
def test_refit_of_a_singular_gram_grows_the_damping_from_the_same_matrix(affine):
    """A kept input that is always zero: the undamped block does not factor, its in-place factor is overwritten,
    and the retry must start again from the block itself. The answer is the closed form at the damping that
    factored."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 20, generator=gen, dtype=torch.float64) + 0.5
    x[:, 6] = 0.0
    w = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    kept = list(range(0, 20, 2))
    stats = _stats(x)
    second = stats.gram / stats.count - (torch.outer(stats.mean, stats.mean) if affine else 0.0)
    block = second[kept][:, kept]
    lam = damping_added(stats.gram[kept][:, kept] if not affine else block * stats.count, 0.0,
                        divisor=stats.count)
    assert lam > 0.0  # the first try failed
    expected = torch.linalg.solve(block + lam * torch.eye(len(kept), dtype=torch.float64), (w @ second[:, kept]).T).T
    new_w, _ = refit_output_projection(w, stats, kept, damping=0.0, affine=affine)
    torch.testing.assert_close(new_w, expected, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(40, 120), features=st.integers(3, 12), out=st.integers(1, 6), seed=st.integers(0, 10_000),
       affine=st.booleans())
def test_refit_equals_lstsq(n, features, out, seed, affine):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen, dtype=torch.float64) + 0.5
    w = torch.randn(out, features, generator=gen, dtype=torch.float64)
    kept = sorted(torch.randperm(features, generator=gen)[: max(1, features // 2)].tolist())
    new_w, new_b = refit_output_projection(w, _stats(x), kept, damping=0.0, affine=affine)
    target = x @ w.T
    design = x[:, kept] if not affine else torch.cat([x[:, kept], torch.ones(n, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target).solution.T  # [out, |S| (+1)]
    torch.testing.assert_close(new_w, solution[:, : len(kept)], atol=1e-7, rtol=1e-6)
    if affine:
        torch.testing.assert_close(new_b, solution[:, -1], atol=1e-7, rtol=1e-6)
    else:
        assert new_b is None


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), damping=st.sampled_from([0.0, 0.001, 0.01, 0.1]))
def test_refit_never_increases_the_calibration_error(seed, damping):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 10, generator=gen, dtype=torch.float64) @ torch.randn(10, 10, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    kept = [0, 2, 3, 7]
    new_w, _ = refit_output_projection(w, _stats(x), kept, damping=damping)
    error_refit = float(((x @ w.T - x[:, kept] @ new_w.T) ** 2).sum(1).mean())
    error_masked = float(((x @ w.T - x[:, kept] @ w[:, kept].T) ** 2).sum(1).mean())
    assert error_refit <= error_masked * (1 + 1e-9) + 1e-12
    if damping == 0.0:
        assert reconstruction_error(w, _stats(x), kept, damping=0.0) == pytest.approx(error_refit, rel=1e-6)


def test_bias_compensation_is_exact_for_constant_removed_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    x[:, [1, 4]] = torch.tensor([0.7, -1.3], dtype=torch.float64)  # the removed inputs never vary
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    b0 = torch.randn(3, generator=gen, dtype=torch.float64)
    kept = [0, 2, 3, 5]
    bias = compensation_bias(w, _stats(x), kept, b0)
    torch.testing.assert_close(x[:, kept] @ w[:, kept].T + bias, x @ w.T + b0, atol=1e-10, rtol=0)
    # the affine refit finds the same exact solution
    new_w, new_b = refit_output_projection(w, _stats(x), kept, damping=0.0, bias=b0, affine=True)
    torch.testing.assert_close(x[:, kept] @ new_w.T + new_b, x @ w.T + b0, atol=1e-8, rtol=0)


def _keep(model):
    return [LayerKeep(kv_heads=tuple(range(s["num_kv_heads"]))[::2] or (0,),
                      mlp_channels=tuple(range(i % 2, s["intermediate"], 2)))
            for i, s in enumerate(layer_shapes(model))]


@pytest.mark.parametrize("mode", ["lstsq", "lstsq-bias", "bias"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_refit_model_prunes_saves_and_reloads(tmp_path, case, mode):
    dense = make_model(case)
    keep = _keep(dense)
    calib, test = token_ids(batch=12, length=24, seed=5), token_ids(batch=3, length=24, seed=9)
    work = copy.deepcopy(dense)
    report, chosen = refit_kept_weights(work, keep, calib, mode=mode, progress=False, micro_batch=5)
    assert chosen == keep  # the given keep is applied as it is
    # every projection's calibration error after the refit is at most the masked one's
    for layer in report["layers"]:
        for name in ("o_proj", "down_proj"):
            assert layer[f"{name}_refit"] <= layer[f"{name}_masked"] * (1 + 1e-6) + 1e-9, (layer, name)
    pruned = pruned_copy(work, keep)
    # the refit (masked) model already computes the pruned one
    torch.testing.assert_close(logits(pruned, test), logits(work, test), atol=2e-5, rtol=0)
    if mode != "lstsq":
        pruned.config.__setattr__(OUTPUT_BIAS_KEY, True)
        assert all(layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
                   for layer in pruned.model.layers)
    folder = save_pruned(pruned, None, tmp_path / "m")
    loaded, _ = load_pruned(folder)
    torch.testing.assert_close(logits(loaded, test), logits(pruned, test), atol=1e-6, rtol=0)
    assert json.loads((folder / "config.json").read_text()).get(OUTPUT_BIAS_KEY, False) is (mode != "lstsq")


@pytest.mark.parametrize("kept_inputs_bytes", [None, 0])  # the output from the kept inputs, or the block run again
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_refit_layer_returns_the_refit_layers_own_output(case, kept_inputs_bytes):
    """What the refit passes on to the next layer is what the refit layer computes: with a norm or a scale after
    the output projection (Gemma, Granite), not the projection's output alone."""
    from layerprune.models.layer_calls import layer_arguments, layer_call
    from layerprune.pruning.refit_loop import refit_layer

    model = make_model(case)
    layer = model.model.layers[1]
    with torch.no_grad():
        hidden, kwargs = layer_arguments(model, input_ids=token_ids(batch=6, length=16, seed=2))
        x = layer_call(model.model.layers[0], hidden, kwargs[0])
    out, _, _ = refit_layer(model, layer, _keep(model)[1], x, kwargs[1], micro_batch=4,
                            kept_inputs_bytes=kept_inputs_bytes)
    with torch.no_grad():
        torch.testing.assert_close(out, layer_call(layer, x, kwargs[1]), atol=2e-5, rtol=0)


def test_refit_brings_the_pruned_model_closer_to_the_dense_one():
    """On held-out tokens, the refit pruned model's logits are closer to the dense model's than masking alone."""
    case = CASES[0]
    dense = make_model(case)
    keep = _keep(dense)
    calib, test = token_ids(batch=32, length=32, seed=5), token_ids(batch=8, length=32, seed=9)
    reference = logits(dense, test)
    masked = float((masked_dense_forward(dense, test, keep) - reference).pow(2).mean())
    work = copy.deepcopy(dense)
    refit_kept_weights(work, keep, calib, mode="lstsq", progress=False)
    refit = float((logits(work, test) - reference).pow(2).mean())
    assert refit < 0.8 * masked


@pytest.mark.parametrize("mode", ["lstsq", "lstsq-bias"])
def test_prune_with_refit_keeps_the_budget_exact(mode):
    """The compensation biases are budgeted: the pruned model's count is the allocation's, to the parameter."""
    case = CASES[4]  # Qwen2: q/k/v biases but none on o_proj, so lstsq-bias adds two per layer
    dense = make_model(case)
    calib, refit_ids = token_ids(batch=4, length=16, seed=3), token_ids(batch=8, length=24, seed=4)
    result = prune(dense, None, plain_config(ratio=0.2, layer_importance="activation", refit=mode), calib_ids=calib,
                   refit_ids=refit_ids, progress=False)
    assert count_parameters(result.model)["total"] == result.allocation.params_after
    assert result.report["method"].endswith(f"+{mode}")
    assert result.report["refit"]["mode"] == mode and len(result.report["refit"]["layers"]) == 3
    # the pruned model keeps (1 - ratio) of the DENSE model's parameters, biases included, like every method
    before = count_parameters(dense)["total"]
    assert abs((before - result.allocation.params_after) - 0.2 * before) <= result.allocation.granule + 1
    assert result.report["actual_ratio"] == pytest.approx(0.2, abs=(result.allocation.granule + 1) / before)


def test_sensitivity_after_refit_measures_the_refit_layer():
    """A point of the refit curve is the loss increase of the model with that one layer pruned and refit."""
    import math

    from layerprune.importance import capture_layer_inputs, sensitivity_importance
    from layerprune.refit import output_projection_grams
    from layerprune.scoring.groups import element_group_scores

    case = CASES[0]
    dense = make_model(case)
    calib, refit_ids = token_ids(batch=4, length=16, seed=1), token_ids(batch=16, length=24, seed=2)
    kv, ch = element_group_scores(dense, calib, "l1", progress=False)
    grams = output_projection_grams(dense, refit_ids, progress=False)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    li = sensitivity_importance(dense, calib, kv, ch, refit_grams=grams, refit="lstsq", progress=False)
    plain = sensitivity_importance(dense, calib, kv, ch, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # weights put back
    assert not all(torch.allclose(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(li.attn_curves, plain.attn_curves))
    # recompute one point by hand: layer 1 keeping 1 KV group (its best by the scores), refit from the grams
    layer, g = 1, 1
    s = layer_shapes(dense)
    best = int(torch.argmax(kv[layer]))
    keep = [LayerKeep(tuple(range(x["num_kv_heads"])), tuple(range(x["intermediate"]))) for x in s]
    keep[layer] = LayerKeep((best,), tuple(range(s[layer]["intermediate"])))
    work = copy.deepcopy(dense)
    o_proj = work.model.layers[layer].self_attn.o_proj
    ratio, hd = s[layer]["num_q_heads"] // s[layer]["num_kv_heads"], s[layer]["head_dim"]
    cols = [(ratio * best + t) * hd + d for t in range(ratio) for d in range(hd)]
    new_w, _ = refit_output_projection(o_proj.weight, grams[layer]["o_proj"], cols)
    with torch.no_grad():
        full = torch.zeros_like(o_proj.weight)
        full[:, cols] = new_w
        o_proj.weight.copy_(full)
    cache = capture_layer_inputs(work, calib, progress=False)
    base = capture_layer_inputs(dense, calib, progress=False).base_loss
    assert math.isclose(li.details["attn_samples"][layer][str(g)], cache.base_loss - base, rel_tol=1e-4, abs_tol=1e-6)


@settings(max_examples=20, deadline=None)
@given(changed=st.integers(0, 12), seed=st.integers(0, 10_000), bias=st.booleans())
def test_output_error_equals_the_direct_mean_squared_difference(changed, seed, bias):
    """The refit report's errors from the Gram (whole, or the block of the few columns that changed) equal
    ``mean ‖(W x + b) − (W' x + b')‖²`` over the rows."""
    from layerprune.pruning.refit_loop import _output_error

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64) + 0.3
    w = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    new_w = w.clone()
    cols = torch.randperm(12, generator=gen)[:changed]
    new_w[:, cols] = torch.randn(5, changed, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64) if bias else None
    new_b = b + 0.1 if bias else None
    direct = float((((x @ w.T + (0 if b is None else b)) - (x @ new_w.T + (0 if new_b is None else new_b))) ** 2)
                   .sum(1).mean())
    assert _output_error(w, b, new_w, new_b, _stats(x)) == pytest.approx(direct, rel=1e-9, abs=1e-12)
