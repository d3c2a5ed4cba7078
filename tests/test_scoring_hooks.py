"""GradientScorer against a plain full backward that keeps every gradient, then the formula."""

from __future__ import annotations


import pytest
import torch
from conftest import make_tiny_llama

from layerprune.errors import InvalidInputError
from layerprune.scoring import GradientScorer
from layerprune.scoring.reference import weight_scores_reference


def _model():
    m = make_tiny_llama(layers=2)
    m.config.use_cache = False
    return m


def _ids(n, seq=12, seed=0):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}


def _assert_scores(scorer, ref_model, kinds, grads, fisher=None):
    for name, mod in _linears(ref_model).items():
        for kind in kinds:
            for axis, got in ((0, scorer.row_scores(name, kind)), (1, scorer.col_scores(name, kind))):
                h = None if fisher is None else fisher[name]
                want = weight_scores_reference(mod.weight, grads[name], h, kind=kind, axis=axis)
                torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-9, msg=f"{name} {kind} axis={axis}")


def test_batch_mode_matches_full_backward_and_frees_grads():
    model, ref = _model(), _model()
    ids = _ids(3)
    ref(ids, labels=ids).loss.backward()
    grads = {n: m.weight.grad.clone() for n, m in _linears(ref).items()}
    with GradientScorer(model, kinds=("taylor", "vectorize", "l1")) as scorer:
        model(ids, labels=ids).loss.backward()
    assert len(scorer.names) == 2 * 7
    for name, mod in _linears(model).items():
        assert mod.weight.grad is None, name  # freed as soon as it was scored
    assert model.lm_head.weight.grad is not None  # not hooked, left alone
    _assert_scores(scorer, ref, ("taylor", "vectorize", "l1"), grads)


def test_batch_mode_micro_batches_sum_per_backward_scores():
    model, ref = _model(), _model()
    parts = [_ids(2, seed=1), _ids(2, seed=2)]
    want = {}
    for ids in parts:
        ref.zero_grad()
        ref(ids, labels=ids).loss.backward()
        for n, m in _linears(ref).items():
            s = weight_scores_reference(m.weight, m.weight.grad, kind="taylor", axis=0)
            want[n] = want.get(n, 0) + s
    with GradientScorer(model) as scorer:
        for ids in parts:
            model(ids, labels=ids).loss.backward()
    for n in want:
        torch.testing.assert_close(scorer.row_scores(n), want[n], rtol=2e-4, atol=1e-9)


@pytest.mark.parametrize("free_grads", [True, False])
def test_accumulate_mode_scores_the_summed_gradient(free_grads):
    model, ref = _model(), _model()
    parts = [_ids(2, seed=3), _ids(1, seed=4)]
    for ids in parts:  # torch accumulates .grad over the two backward passes
        ref(ids, labels=ids).loss.backward()
    grads = {n: m.weight.grad.clone() for n, m in _linears(ref).items()}
    with GradientScorer(model, kinds=("taylor", "vectorize"), mode="accumulate", free_grads=free_grads) as scorer:
        for ids in parts:
            model(ids, labels=ids).loss.backward()
        scorer.step()
    _assert_scores(scorer, ref, ("taylor", "vectorize"), grads)


def test_per_sample_mode_matches_llm_pruner_param_mix():
    """LLM-Pruner: acc_grad = Σ_s g_s² / N (one backward per sample), then one backward of the
    whole batch's mean loss for G; salience = W·G − ½·W·acc_grad·W, |·| summed."""
    model, ref = _model(), _model()
    batch = _ids(4, seed=5)
    n = batch.shape[0]
    fisher = {}
    for s in range(n):
        ref.zero_grad()
        x = batch[s : s + 1]
        ref(x, labels=x).loss.backward()
        for name, m in _linears(ref).items():
            fisher[name] = fisher.get(name, 0) + m.weight.grad.square() / n
    ref.zero_grad()
    ref(batch, labels=batch).loss.backward()
    grads = {name: m.weight.grad.clone() for name, m in _linears(ref).items()}
    kinds = ("taylor", "vectorize", "taylor2", "taylor-mix")
    with GradientScorer(model, kinds=kinds, mode="per_sample") as scorer:
        for s in range(n):
            x = batch[s : s + 1]
            model(x, labels=x).loss.backward()
            scorer.step()
    assert scorer.steps == n
    _assert_scores(scorer, ref, kinds, grads, fisher)


def test_free_grads_false_batch_mode_needs_a_step_per_backward():
    model = _model()
    ids = _ids(1)
    with GradientScorer(model, free_grads=False) as scorer:
        model(ids, labels=ids).loss.backward()
        assert model.model.layers[0].mlp.up_proj.weight.grad is not None
        model.zero_grad()
        scorer.step()
        model(ids, labels=ids).loss.backward()
        with pytest.raises(InvalidInputError, match="second backward"):
            model(ids, labels=ids).loss.backward()


def test_scorer_input_errors():
    model = _model()
    with pytest.raises(InvalidInputError, match="^kinds:"):
        GradientScorer(model, kinds=("taylor2",))
    with pytest.raises(InvalidInputError, match="^kinds:"):
        GradientScorer(model, kinds=("nope",))
    with pytest.raises(InvalidInputError, match="^mode:"):
        GradientScorer(model, mode="x")
    with pytest.raises(InvalidInputError, match="^module_filter:"):
        GradientScorer(model, module_filter=lambda n, m: False)
    with pytest.raises(InvalidInputError, match="^model:"):
        GradientScorer(torch.nn.Linear(2, 2))
    scorer = GradientScorer(model, module_filter=lambda n, m: n == "model.layers.1.mlp.down_proj")
    with scorer:
        ids = _ids(1)
        model(ids, labels=ids).loss.backward()
    with pytest.raises(InvalidInputError, match="^name:"):
        scorer.row_scores("model.layers.0.mlp.down_proj")
    with pytest.raises(InvalidInputError, match="^kind:"):
        scorer.row_scores("model.layers.1.mlp.down_proj", "l2")
    assert scorer.col_scores("model.layers.1.mlp.down_proj").shape == (96,)
