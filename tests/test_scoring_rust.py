"""Rust backend (layerprune._core) against the torch reference: every kind, axis, group size, dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scoring_cases import DTYPES, SCORE_KINDS, assert_scores_close, group_sizes, make_inputs

from layerprune import _core
from layerprune.errors import InvalidInputError
from layerprune.scoring import ActivationStats, weight_scores

SHAPES = [(1, 1), (3, 5), (17, 33), (64, 257), (130, 70), (24, 4099)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rust_matches_reference(dtype, shape):
    rows, cols = shape
    w, g, h = make_inputs(rows, cols, dtype, seed=rows * 31 + cols)
    for kind in SCORE_KINDS:
        for axis, n in ((0, rows), (1, cols)):
            for gs in group_sizes(n):
                got = weight_scores(w, g, h, kind=kind, axis=axis, group_size=gs, backend="rust")
                assert_scores_close(got, w, g, h, kind=kind, axis=axis, group_size=gs, ctx=f"{kind} axis={axis} gs={gs}")


def test_auto_uses_rust_on_contiguous_cpu_and_reads_in_place(monkeypatch):
    from layerprune.scoring import dispatch

    core = dispatch._rust_core()
    seen = []

    class Spy:
        """The compiled core, recording the arrays `auto` hands it."""

        def weight_scores(self, *arrays, **kwargs):
            seen.append(arrays)
            return core.weight_scores(*arrays, **kwargs)

    monkeypatch.setattr(dispatch, "_rust_core", lambda: Spy())
    w, g, _ = make_inputs(16, 12, torch.bfloat16)
    got = weight_scores(w, g, kind="taylor", axis=1, group_size=4)
    assert_scores_close(got, w, g, None, kind="taylor", axis=1, group_size=4)
    assert len(seen) == 1, "auto did not pick the rust backend for contiguous CPU tensors"
    weight_view = seen[0][0]
    assert np.shares_memory(weight_view, w.view(torch.int16).numpy())  # the core read w in place, no copy
    # and a non-contiguous input falls back to torch without touching the core
    weight_scores(w.t(), g.t(), kind="taylor", axis=1)
    assert len(seen) == 1


def test_rust_mixed_dtypes_are_widened():
    w, g, h = make_inputs(10, 6, torch.bfloat16)
    got = weight_scores(w, g, h.float(), kind="taylor-mix", axis=0, backend="rust")
    assert_scores_close(got, w, g, h.float(), kind="taylor-mix", axis=0, group_size=1)


def test_rust_core_errors_are_invalid_input():
    a = np.zeros((4, 6), dtype=np.float32)
    with pytest.raises(InvalidInputError, match="^group_size:"):
        _core.weight_scores(a, a, kind="taylor", group_size=5)
    with pytest.raises(InvalidInputError, match="^kind:"):
        _core.weight_scores(a, kind="nope")
    with pytest.raises(InvalidInputError, match="^weight:.*C-contiguous"):
        _core.weight_scores(np.asfortranarray(np.zeros((4, 6), dtype=np.float32)), kind="l1")
    with pytest.raises(InvalidInputError, match="^grad: shape"):
        _core.weight_scores(a, np.zeros((6, 4), dtype=np.float32), kind="taylor")
    with pytest.raises(InvalidInputError, match="^dtype:"):
        _core.weight_scores(a, kind="l1", dtype="float64")
    with pytest.raises(InvalidInputError, match="^weight:"):
        _core.weight_scores(a.astype(np.float64), kind="l1")
    assert _core.scoring_threads() >= 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rust_channel_sums(dtype):
    x = (torch.randn(3, 37, 4099, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    stats = ActivationStats(backend="rust")
    stats.update(x)
    xf = x.reshape(-1, 4099).double()
    torch.testing.assert_close(stats.sum.double(), xf.sum(0), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.sumsq.double(), xf.square().sum(0), rtol=1e-5, atol=1e-3)
