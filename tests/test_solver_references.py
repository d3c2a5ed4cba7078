"""`dp` against the reference optimisers of the benchmark (HiGHS MILP, OR-Tools CP-SAT) on generated instances,
with one, two and three budgets. Runs when the `bench` extra is installed (`make test` installs it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.allocation import AllocationSpec, LayerShape, allocate
from layerprune.allocation.references import build_knapsack, solve_cpsat, solve_highs
from layerprune.errors import InfeasibleError

pytest.importorskip("highspy")


def curve(rng: np.random.Generator, n: int, convex: bool) -> np.ndarray:
    inc = rng.random(n)
    if convex:
        inc = np.sort(inc)[::-1]
    out = np.zeros(n + 1)
    out[:-1] = np.cumsum(inc[::-1])[::-1]
    return out


@st.composite
def instances(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(2, 6))
    hkv, r = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    inter, step = draw(st.integers(4, 40)), draw(st.integers(1, 4))
    shape = LayerShape(hidden=draw(st.integers(2, 12)), num_q_heads=hkv * r, num_kv_heads=hkv,
                       head_dim=draw(st.integers(1, 8)), intermediate=inter, norm_params=2)
    convex = draw(st.booleans())
    nf = -(-inter // step) + 1
    spec = AllocationSpec(
        ratio=draw(st.floats(0.05, 0.6)),
        layers=[shape] * n,
        extra_params=draw(st.integers(0, 500)),
        extra_flops=draw(st.integers(0, 500)),
        attn_curves=[curve(rng, hkv, convex) * draw(st.floats(0.1, 4.0)) for _ in range(n)],
        mlp_curves=[curve(rng, nf - 1, convex) for _ in range(n)],
        mlp_step=step,
        protected=tuple(draw(st.sets(st.integers(0, n - 1), max_size=1))),
        tie=draw(st.booleans()),
        flops_seq_len=draw(st.integers(1, 64)),
    )
    kv, fl, params = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
    if kv or fl:
        try:
            alone = allocate(dataclasses.replace(spec), "dp") if params else None
        except InfeasibleError:
            alone = None
        scale = draw(st.floats(0.5, 1.2))
        if kv:
            spec.kv_cache_ratio = min(0.9, (alone.actual_kv_cache_ratio if alone else 0.4) * scale)
        if fl:
            spec.flops_ratio = min(0.9, (alone.actual_flops_ratio if alone else 0.3) * scale)
    if not params:
        spec.ratio = None
    return spec


def _feasible_solution_expected(spec: AllocationSpec):
    try:
        return allocate(spec, "dp")
    except InfeasibleError:
        return None


@settings(max_examples=40, deadline=None)
@given(instances())
def test_dp_equals_the_highs_optimum(spec):
    dp = _feasible_solution_expected(spec)
    ref = solve_highs(spec, time_limit=60)
    if dp is None:
        assert ref.objective is None and ref.status == "infeasible"
        return
    assert ref.proven_optimal, ref.status
    ks = build_knapsack(spec)
    if ks.params_window is not None:  # the same parameter window (narrow unless no answer lands in it)
        assert (ref.window == "narrow") == (dp.granule == ks.params_window[1] - ks.params_window[0])
    assert dp.objective == pytest.approx(ref.objective, rel=1e-7, abs=1e-9)
    assert dp.proven_optimal


@settings(max_examples=10, deadline=None)
@given(instances())
def test_dp_equals_the_cpsat_optimum(spec):
    _dp_equals_the_cpsat_optimum(spec)


def _dp_equals_the_cpsat_optimum(spec):
    pytest.importorskip("ortools")
    dp = _feasible_solution_expected(spec)
    ref = solve_cpsat(spec, time_limit=60)
    if dp is None:
        assert ref.objective is None
        return
    assert ref.proven_optimal, ref.status
    # CP-SAT optimises losses scaled to integers: equal to within the scaling's rounding
    assert dp.objective <= ref.objective + 1e-9
    assert ref.objective - dp.objective <= 1e-6 * (1 + abs(dp.objective))


def test_dp_equals_the_cpsat_optimum_where_no_option_costs_more():
    """Hypothesis's find (make test-latest, 2026-12-07): with one KV group a layer kept (min_kv_groups=1) and one MLP
    step, the options' losses spanned 0, the objective scale was 1e9 / 1e-300 = inf, and inf · 0 = NaN."""
    spec = AllocationSpec(ratio=0.5, layers=[LayerShape(2, 1, 1, 1, 4, norm_params=2)] * 2, extra_params=0,
                          attn_curves=[np.array([0.63696169, 0.0]), np.array([0.26978671, 0.0])],
                          mlp_curves=[np.array([0.04097352, 0.0]), np.array([0.01652764, 0.0])], mlp_step=4,
                          flops_seq_len=1)
    _dp_equals_the_cpsat_optimum(spec)
