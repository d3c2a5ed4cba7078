"""Structured OBS (``--importance obs``): the greedy removal order, errors and refit weights against brute force
and torch.linalg.lstsq; the layer's choice the best one-group removal; OBS-pruned models of every family land on
their budget and reload with the same logits."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch
from families import CASE_IDS, CASES, logits, make_model, token_ids, plain_config
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.arch import gqa, layer_shapes
from layerprune.errors import InvalidInputError
from layerprune.export import save_pruned
from layerprune.models import count_parameters, load_pruned
from layerprune.pruning import prune
from layerprune.pruning.refit_loop import refit_kept_weights
from layerprune.refit import InputGram, reconstruction_error
from layerprune.refit.obs import structured_obs
from layerprune.scoring.selection import LayerKeep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stats(x: torch.Tensor) -> InputGram:
    stats = InputGram.empty(x.shape[1], device="cpu")
    for part in x.chunk(3):
        stats.update(part)
    return stats


def _brute(w: torch.Tensor, stats: InputGram, removed_cols: list[int], damping: float,
           row_weights: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Minimum of ``Σ_i w_i (W − W')_i Ĥ (W − W')_iᵀ`` over ``W'`` with the removed columns zero, by a direct solve."""
    h = stats.gram / stats.count
    hh = h + damping * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype)
    kept = [c for c in range(h.shape[0]) if c not in set(removed_cols)]
    best = torch.zeros_like(w)
    if kept:
        best[:, kept] = torch.linalg.solve(hh[kept][:, kept], (w @ hh[:, kept]).T).T
    d = w - best
    per_row = torch.einsum("ij,jk,ik->i", d, hh, d)
    return float(per_row.sum() if row_weights is None else per_row @ row_weights), best


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_groups=st.integers(2, 5), size=st.integers(1, 3), out=st.integers(1, 4),
       damping=st.sampled_from([0.0, 0.01, 0.1]), weighted=st.booleans())
def test_obs_is_the_stepwise_brute_force(seed, n_groups, size, out, damping, weighted):
    """Every greedy step removes the group whose removal (with the refit) costs least, among all the ones left,
    and every stage's error and weights are the exact refit optimum for its removed set."""
    gen = torch.Generator().manual_seed(seed)
    features = n_groups * size
    x = torch.randn(5 * features, features, generator=gen, dtype=torch.float64)
    x = x @ torch.randn(features, features, generator=gen, dtype=torch.float64) + 0.3
    w = torch.randn(out, features, generator=gen, dtype=torch.float64)
    perm = torch.randperm(features, generator=gen).tolist()  # groups need not be contiguous
    groups = [perm[i * size:(i + 1) * size] for i in range(n_groups)]
    rw = torch.rand(out, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    stats = _stats(x)
    stages = structured_obs(w, stats, groups, range(n_groups + 1), damping=damping, row_weights=rw)
    assert [len(s.removed) for s in stages] == list(range(n_groups + 1))
    for before, stage in zip(stages, stages[1:]):
        cols = lambda gs: [c for g in gs for c in groups[g]]  # noqa: E731
        left = [g for g in range(n_groups) if g not in before.removed]
        costs = {g: _brute(w, stats, cols(before.removed + (g,)), damping, rw)[0] for g in left}
        new = stage.removed[-1]
        assert costs[new] <= min(costs.values()) * (1 + 1e-8) + 1e-10
        error, best = _brute(w, stats, cols(stage.removed), damping, rw)
        assert stage.error == pytest.approx(error, rel=1e-7, abs=1e-9)
        torch.testing.assert_close(stage.weight, best, atol=1e-7, rtol=1e-6)


def test_obs_one_removal_is_the_global_optimum_and_undamped_weights_are_lstsq():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(120, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    groups = [[0, 1], [2, 3], [4, 5], [6, 7]]
    stats = _stats(x)
    stage = structured_obs(w, stats, groups, [1], damping=0.0)[0]
    errors = {g: reconstruction_error(w, stats, [c for k in groups if k != groups[g] for c in k], damping=0.0)
              for g in range(4)}
    assert stage.removed == (min(errors, key=errors.get),)
    assert stage.error == pytest.approx(min(errors.values()), rel=1e-8)
    kept = [c for k, gr in enumerate(groups) if k != stage.removed[0] for c in gr]
    solution = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    torch.testing.assert_close(stage.weight[:, kept], solution, atol=1e-8, rtol=1e-7)
    # exhaustive search over pairs: the greedy pair is reported, and never better than the optimum
    pair = structured_obs(w, stats, groups, [2], damping=0.0)[0]
    best_pair = min(reconstruction_error(w, stats, [c for k in range(4) if k not in p for c in groups[k]], damping=0.0)
                    for p in itertools.combinations(range(4), 2))
    assert pair.error >= best_pair * (1 - 1e-9)


def test_obs_batches_remove_the_requested_counts():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 40, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 40, generator=gen, dtype=torch.float64)
    stats = _stats(x)
    stages = structured_obs(w, stats, [[c] for c in range(40)], [5, 17, 40], batch_fraction=0.25)
    assert [len(s.removed) for s in stages] == [5, 17, 40] and len(set(stages[-1].removed)) == 40
    assert stages[0].removed == stages[1].removed[:5]  # nested
    for s in stages:
        error, best = _brute(w, stats, list(s.removed), 0.01)
        assert s.error == pytest.approx(error, rel=1e-7)
        torch.testing.assert_close(s.weight, best, atol=1e-8, rtol=1e-6)
    assert stages[0].error <= stages[1].error <= stages[2].error


def test_obs_refuses_bad_input():
    stats = _stats(torch.randn(20, 4, dtype=torch.float64))
    w = torch.randn(2, 4, dtype=torch.float64)
    for groups, counts in (([[0, 1], [1, 2]], [1]), ([[0], [1, 2]], [1]), ([[0, 5]], [1]), ([[0], [1]], [3])):
        with pytest.raises(InvalidInputError):
            structured_obs(w, stats, groups, counts)


def test_layer_obs_choice_is_the_best_single_kv_group_removal():
    """In a real layer (GQA 4:1... of the Llama case), keeping all but one KV group: OBS removes the group whose
    removal leaves the least o_proj error after the refit, over every choice (brute force)."""
    case = CASES[0]
    dense = make_model(case)
    shapes = layer_shapes(dense)
    calib = token_ids(batch=8, length=24, seed=5)
    keep = [LayerKeep(tuple(range(s["num_kv_heads"] - 1)), tuple(range(s["intermediate"]))) for s in shapes]
    work = copy.deepcopy(dense)
    report, chosen = refit_kept_weights(work, keep, calib, mode="lstsq", damping=0.0, progress=False, select="obs")
    # layer 0's inputs are the dense model's in any case: brute force over the removed group
    s = shapes[0]
    ratio, hd, h = s["num_q_heads"] // s["num_kv_heads"], s["head_dim"], s["num_kv_heads"]
    stats = InputGram.empty(s["num_q_heads"] * hd)
    handle = dense.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: stats.update(a[0]))
    with torch.no_grad():
        dense(calib)
    handle.remove()
    w = dense.model.layers[0].self_attn.o_proj.weight.detach().double()
    errors = {j: reconstruction_error(w, stats, gqa.q_rows([k for k in range(h) if k != j], ratio, hd), damping=0.0)
              for j in range(h)}
    removed = (set(range(h)) - set(chosen[0].kv_heads)).pop()
    assert removed == min(errors, key=errors.get)
    assert report["layers"][0]["o_proj_refit"] == pytest.approx(errors[removed], rel=1e-4)
    assert report["select"] == "obs" and all(len(c.kv_heads) == s["num_kv_heads"] - 1 for c in chosen)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_obs_pruned_model_lands_on_budget_and_reloads(tmp_path, case):
    dense = make_model(case)
    calib, refit_ids, test = token_ids(4, 16, 3), token_ids(8, 24, 4), token_ids(3, 24, 9)
    config = plain_config(ratio=0.25, layer_importance="sensitivity", importance="obs", refit="lstsq")
    result = prune(dense, None, config, calib_ids=calib, refit_ids=refit_ids, progress=False)
    assert count_parameters(result.model)["total"] == result.allocation.params_after
    assert result.report["method"].endswith("+lstsq+obs") and result.report["refit"]["select"] == "obs"
    kept = result.report["layers"]
    assert [len(k["kv_heads_kept"]) for k in kept] == [a.kv_groups_kept for a in result.allocation.layers]
    folder = save_pruned(result.model, None, tmp_path / "m")
    loaded, _ = load_pruned(folder)
    torch.testing.assert_close(logits(loaded, test), logits(result.model, test), atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [dict(refit="none"), dict(refit="bias"), dict(mode="flap", refit="lstsq"),
                                    dict(refit="lstsq", iterative_steps=2)])
def test_obs_refuses_what_it_cannot_do(config):
    from layerprune.pruning.config import validate_config

    with pytest.raises(InvalidInputError, match="importance obs"):
        validate_config(plain_config(ratio=0.2, importance="obs", **config))


def test_cli_refuses_obs_without_refit_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "layerprune", "prune", "--model", "nowhere", "--importance", "obs",
                           "--refit", "none", "--ratio", "0.2", "--out", "/tmp/never"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "needs refit lstsq" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
