"""Triton kernels against the torch reference. Without CUDA they run in the Triton interpreter
(conftest sets TRITON_INTERPRET=1) on CPU tensors; with CUDA, on the GPU. Never skipped."""

from __future__ import annotations

import pytest
import torch
from scoring_cases import DTYPES, SCORE_KINDS, assert_scores_close, group_sizes, make_inputs

from layerprune.kernels import HAS_TRITON
from layerprune.scoring import weight_scores

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# small for the interpreter, but odd sizes and not multiples of the blocks (16×256 / 32×128)
SHAPES = [(3, 5), (17, 33), (40, 300)]


def test_triton_is_installed():
    assert HAS_TRITON


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("axis", [0, 1])
def test_weight_scores_triton_matches_reference(dtype, shape, axis):
    rows, cols = shape
    w, g, h = make_inputs(rows, cols, dtype, seed=rows + cols)
    wd, gd, hd = (t.to(DEVICE) for t in (w, g, h))
    n = rows if axis == 0 else cols
    for kind in SCORE_KINDS:
        for gs in group_sizes(n):
            got = weight_scores(wd, gd, hd, kind=kind, axis=axis, group_size=gs, backend="triton")
            assert got.device.type == DEVICE
            assert_scores_close(got.cpu(), w, g, h, kind=kind, axis=axis, group_size=gs, ctx=f"{kind} gs={gs}")


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("programs", [3, 64])
def test_split_reduction(axis, programs):
    """Many programs per output line: partial sums meet through atomic adds into groups."""
    from layerprune.kernels.weight_scores import weight_scores_triton

    w, g, h = make_inputs(70, 530, torch.float32, seed=5)
    for kind, gs in (("taylor", 10 if axis == 0 else 53), ("vectorize", 5 if axis == 0 else 2), ("taylor-mix", 1)):
        got = weight_scores_triton(w.to(DEVICE), g.to(DEVICE), h.to(DEVICE), kind=kind, axis=axis, group_size=gs, programs=programs)
        assert_scores_close(got.cpu(), w, g, h, kind=kind, axis=axis, group_size=gs, ctx=f"{kind} gs={gs} p={programs}")


def test_non_contiguous_rows_are_handled():
    w, g, _ = make_inputs(20, 16, torch.float32)
    ws, gs_ = w[:, ::2], g[:, ::2]  # stride(1) == 2
    got = weight_scores(ws.to(DEVICE), gs_.to(DEVICE), kind="taylor", axis=1, backend="triton")
    assert_scores_close(got.cpu(), ws, gs_, None, kind="taylor", axis=1, group_size=1)
    wv, gv = w[2:18], g[2:18]  # row slice: stride(0) == cols, stride(1) == 1, offset storage
    got = weight_scores(wv.to(DEVICE), gv.to(DEVICE), kind="vectorize", axis=0, group_size=4, backend="triton")
    assert_scores_close(got.cpu(), wv, gv, None, kind="vectorize", axis=0, group_size=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("programs", [None, 16])
def test_channel_sums_triton(dtype, programs):
    from layerprune.kernels.activation_stats import channel_sums_triton

    x = (torch.randn(77, 131, generator=torch.Generator().manual_seed(4)) * 2).to(dtype)
    s, q = channel_sums_triton(x.to(DEVICE), programs=programs)
    xf = x.double()
    torch.testing.assert_close(s.cpu().double(), xf.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(q.cpu().double(), xf.square().sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1])
def test_every_tuning_candidate_matches_reference(axis):
    """The tuner (benches/tune_triton.py) may pick any candidate tile: each one must be correct,
    including tiles wider than the matrix and split reductions."""
    from layerprune.kernels.weight_scores import TUNING_CANDIDATES, weight_scores_triton

    w, g, h = make_inputs(48, 136, torch.bfloat16, seed=11)
    gs = 16 if axis == 0 else 8
    for cfg in TUNING_CANDIDATES[axis]:
        for programs in (None, 7):
            got = weight_scores_triton(w.to(DEVICE), g.to(DEVICE), h.to(DEVICE), kind="taylor-mix", axis=axis,
                                       group_size=gs, programs=programs, config=cfg)
            assert_scores_close(got.cpu(), w, g, h, kind="taylor-mix", axis=axis, group_size=gs, ctx=f"{cfg} p={programs}")


def test_launch_config_rejects_non_powers_of_two():
    from layerprune.kernels.weight_scores import LaunchConfig

    with pytest.raises(ValueError, match="block_c must be a power of two"):
        LaunchConfig(16, 100)


def test_target_programs_counts_sms_once_per_device(monkeypatch):
    """The grid target on CUDA is programs_per_sm × SMs, looked up once per device (checked with a
    stand-in for the device query, so it runs without a GPU); 1 elsewhere."""
    import types

    import layerprune.kernels as kernels

    calls = []

    def fake_properties(index):
        calls.append(index)
        return types.SimpleNamespace(multi_processor_count=132 if index == 0 else 108)

    monkeypatch.setattr(torch.cuda, "get_device_properties", fake_properties)
    kernels._sm_count.cache_clear()
    try:
        assert kernels.target_programs(torch.device("cuda", 0), 4) == 528
        assert kernels.target_programs(torch.device("cuda", 0), 2) == 264
        assert kernels.target_programs(torch.device("cuda", 1), 1) == 108
        assert calls == [0, 1]
        assert kernels.target_programs(torch.device("cpu"), 4) == 1
    finally:
        kernels._sm_count.cache_clear()


def test_reductions_use_no_atomics():
    """Split reductions write per-split partials that are summed in a fixed order: floating-point atomics
    would make near-tied scores (and so the kept heads) differ from run to run on a GPU."""
    import inspect

    import layerprune.kernels.activation_stats as activation_stats
    import layerprune.kernels.weight_scores as weight_scores_module

    for module in (weight_scores_module, activation_stats):
        source = inspect.getsource(module)
        assert "atomic_" not in source.replace("no atomics", ""), module.__name__
