"""The torch reference against explicit float64 formulas, and the public API's input checks."""

from __future__ import annotations

import pytest
import torch
from scoring_cases import make_inputs

from layerprune.errors import InvalidInputError
from layerprune.scoring import (
    SCORE_KINDS,
    ActivationStats,
    flap_channel_scores,
    wanda_channel_scores,
    weight_scores,
)
from layerprune.scoring.reference import weight_scores_reference


def _explicit(w, g, h, kind, axis, gs):
    """Loop-free but independent float64 statement of each formula (LLM-Pruner / TP style)."""
    w, g, h = w.double(), g.double(), h.double()
    if axis == 1:  # TP: transpose(0, 1).flatten(1) then reduce over dim 1
        w, g, h = w.t(), g.t(), h.t()
    salience = {
        "taylor": w * g,
        "vectorize": w * g,
        "taylor2": w * h * w,
        "taylor-mix": w * g - 0.5 * w * h * w,
        "l1": w.abs(),
        "l2": w.abs().pow(2),
    }[kind]
    if kind == "vectorize":
        return salience.reshape(-1, gs * salience.shape[1]).sum(1).abs()
    return salience.abs().sum(1).reshape(-1, gs).sum(1)


@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("gs", [1, 3])
def test_reference_matches_explicit_formula(kind, axis, gs):
    w, g, h = make_inputs(12, 9, torch.float32, seed=3)
    got = weight_scores_reference(w, g, h, kind=kind, axis=axis, group_size=gs)
    want = _explicit(w, g, h, kind, axis, gs)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)


def test_torch_backend_is_the_reference_and_handles_views():
    w, g, _ = make_inputs(8, 6, torch.float32)
    wt, gt = w.t(), g.t()  # non-contiguous
    got = weight_scores(wt, gt, kind="taylor", axis=0, group_size=2, backend="torch")
    torch.testing.assert_close(got, (wt * gt).abs().sum(1).view(-1, 2).sum(1))
    auto = weight_scores(wt, gt, kind="taylor", axis=0, group_size=2)  # non-contiguous -> torch
    torch.testing.assert_close(auto, got)


def test_vectorize_takes_abs_after_group_sum():
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    g = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert weight_scores(w, g, kind="vectorize", axis=0, group_size=2, backend="torch").item() == 0.0
    assert weight_scores(w, g, kind="taylor", axis=0, group_size=2, backend="torch").item() == 4.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"kind": "taylor3"}, "kind"),
        ({"axis": 2}, "axis"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 4}, "group_size"),
        ({"backend": "cuda"}, "backend"),
        ({"kind": "taylor", "grad": None}, "grad"),
        ({"kind": "taylor2"}, "fisher"),
        ({"grad": torch.zeros(3, 5)}, "grad"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    w = torch.zeros(6, 5)
    kwargs = dict(kwargs)
    grad = kwargs.pop("grad", torch.zeros(6, 5))
    with pytest.raises(InvalidInputError, match=rf"^{field}:"):
        weight_scores(w, grad, **kwargs)


def test_bad_weight_rank_and_dtype():
    with pytest.raises(InvalidInputError, match="^weight:"):
        weight_scores(torch.zeros(4), kind="l1")
    with pytest.raises(InvalidInputError, match="^weight:"):
        weight_scores(torch.zeros(4, 4, dtype=torch.float64), kind="l1")


@pytest.mark.parametrize("backend", ["torch", "rust", "triton"])
def test_activation_stats_accumulate_over_batches(backend):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 7, generator=gen) * 3 + 1, torch.randn(1, 9, 7, generator=gen)]
    stats = ActivationStats(backend=backend)
    for b in batches:
        stats.update(b)
    allx = torch.cat([b.reshape(-1, 7) for b in batches]).double()
    assert stats.count == 19
    torch.testing.assert_close(stats.mean, allx.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.var, allx.var(0, unbiased=False).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.l2, allx.norm(dim=0).float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match="^x:"):
        stats.update(torch.zeros(3, 8))


def test_activation_stats_empty_is_an_error():
    with pytest.raises(InvalidInputError):
        _ = ActivationStats().mean


def test_wanda_and_flap_channel_scores():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=gen)
    x = torch.randn(50, 8, generator=gen) * torch.arange(1, 9)
    stats = ActivationStats()
    stats.update(x)
    xn = x.double().norm(dim=0)
    per_elem = w.double().abs() * xn  # Wanda metric |W_ij|·‖X_j‖
    torch.testing.assert_close(wanda_channel_scores(w, stats, axis=1).double(), per_elem.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        wanda_channel_scores(w, stats, axis=0, group_size=2).double(), per_elem.sum(1).view(3, 2).sum(1), rtol=1e-5, atol=1e-6
    )
    flap = x.double().var(0, unbiased=False) * w.double().pow(2).sum(0)
    torch.testing.assert_close(flap_channel_scores(w, stats, group_size=4).double(), flap.view(2, 4).sum(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match="^stats:"):
        flap_channel_scores(w.t(), stats)
