"""Allocation solvers through the Python API: exact parameter counts, constraints, brute force,
errors, JSON round trip and the `layerprune allocate` CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.allocation import (
    SOLVERS,
    AllocationSpec,
    LayerShape,
    allocate,
    load_spec,
    spec_from_json,
    spec_from_model_config,
    spec_to_json,
    target_count,
)
from layerprune.cli import main as cli_main
from layerprune.errors import InfeasibleError, InvalidInputError

# The solvers that choose per layer (`homogeneous`, one width for every layer, has its own tests in
# tests/test_homogeneous.py: it refuses protected layers and has its own window).
PER_LAYER_SOLVERS = tuple(s for s in SOLVERS if s != "homogeneous")

SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def half_away_from_zero(x: float) -> int:
    """The budget's rounding rule, written independently of the package: the float's exact decimal value,
    rounded half away from zero (Python's round() rounds half to even: 12.5 -> 12, the budget says 13)."""
    return int(Decimal(x).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def target_of(ratio: float, total: int) -> int:
    return half_away_from_zero(ratio * total)


def allowed_mlp(i: int, step: int) -> list[int]:
    return [f for f in range(0, i, step)] + [i]


def layer_ok(spec: AllocationSpec, l: int, g: int, f: int) -> bool:
    """Every constraint of the spec for layer l, written independently of the solver."""
    s = spec.layers[l]
    n = len(spec.layers)
    prot = l in spec.protected
    attn_on = not prot and (spec.attn_layer_start or 0) <= l < (spec.attn_layer_end if spec.attn_layer_end is not None else n)
    mlp_on = not prot and (spec.mlp_layer_start or 0) <= l < (spec.mlp_layer_end if spec.mlp_layer_end is not None else n)
    if f not in allowed_mlp(s.intermediate, spec.mlp_step) or not 0 <= g <= s.num_kv_heads:
        return False
    if not attn_on and g != s.num_kv_heads or not mlp_on and f != s.intermediate:
        return False
    ar, mr = 1 - g / s.num_kv_heads, 1 - f / s.intermediate
    lo_a = spec.min_rate if spec.min_attn_rate is None else spec.min_attn_rate
    hi_a = spec.max_rate if spec.max_attn_rate is None else spec.max_attn_rate
    lo_m = spec.min_rate if spec.min_mlp_rate is None else spec.min_mlp_rate
    hi_m = spec.max_rate if spec.max_mlp_rate is None else spec.max_mlp_rate
    if attn_on and (g < spec.min_kv_groups or ar < lo_a - 1e-9 or ar > hi_a + 1e-9):
        return False
    min_mlp = spec.min_mlp if spec.min_mlp is not None else min(spec.mlp_step, s.intermediate)
    if mlp_on and (f < min_mlp or mr < lo_m - 1e-9 or mr > hi_m + 1e-9):
        return False
    if spec.tie and attn_on and mlp_on and abs(f / s.intermediate - g / s.num_kv_heads) > 0.5 / s.num_kv_heads + 1e-12:
        return False
    return True


def layer_loss(spec: AllocationSpec, l: int, g: int, f: int) -> float:
    s = spec.layers[l]
    if spec.attn_curves is not None:
        a = float(spec.attn_curves[l][g])
    else:
        w = spec.attn_importance if spec.attn_importance is not None else spec.importance
        a = 0.0 if w is None else float(w[l]) * (1 - g / s.num_kv_heads) ** 2
    if spec.mlp_curves is not None:
        j = math.ceil(s.intermediate / spec.mlp_step) if f == s.intermediate else f // spec.mlp_step
        m = float(spec.mlp_curves[l][j])
    else:
        w = spec.mlp_importance if spec.mlp_importance is not None else spec.importance
        m = 0.0 if w is None else float(w[l]) * (1 - f / s.intermediate) ** 2
    return a + m


def check_result(spec: AllocationSpec, res, budget: bool = True) -> None:
    assert len(res.layers) == len(spec.layers)
    kept = 0
    objective = 0.0
    for l, la in enumerate(res.layers):
        s = spec.layers[l]
        assert layer_ok(spec, l, la.kv_groups_kept, la.mlp_kept), (res.solver, l, la)
        assert la.q_heads_kept == la.kv_groups_kept * (s.num_q_heads // s.num_kv_heads)
        assert la.params_kept == s.params(la.kv_groups_kept, la.mlp_kept)
        assert la.attn_rate == pytest.approx(1 - la.kv_groups_kept / s.num_kv_heads)
        assert la.mlp_rate == pytest.approx(1 - la.mlp_kept / s.intermediate)
        kept += la.params_kept
        objective += layer_loss(spec, l, la.kv_groups_kept, la.mlp_kept)
    assert res.params_before == spec.params_total
    assert res.params_after == kept + spec.extra_params
    assert res.objective == pytest.approx(objective, rel=1e-9, abs=1e-9)
    assert res.actual_ratio == pytest.approx((res.params_before - res.params_after) / res.params_before)
    assert res.actual_ratio_layers == pytest.approx((spec.params_layers - kept) / spec.params_layers)
    if spec.ratio is None:
        assert res.target_removed is None
        return
    assert res.target_removed == target_of(spec.ratio, spec.params_total)
    if budget:
        assert res.target_removed <= res.params_removed <= res.target_removed + res.granule, res.solver


def smollm2_spec(ratio: float = 0.25, **kw) -> AllocationSpec:
    rng = np.random.default_rng(0)
    kw.setdefault("importance", rng.uniform(0.5, 3.0, 30))
    return spec_from_model_config(SMOLLM2_CONFIG, ratio, **kw)


# ---------------------------------------------------------------- parameter counting


def test_spec_from_model_config_counts_smollm2_exactly():
    from transformers import LlamaConfig

    spec = spec_from_model_config(LlamaConfig(**SMOLLM2_CONFIG), 0.25)
    assert spec.params_total == 134_515_008
    assert len(spec.layers) == 30
    assert spec_from_model_config(SMOLLM2_CONFIG, 0.25).params_total == 134_515_008


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_spec_counts_match_model_parameters(tiny_llama, tie, bias):
    model = tiny_llama(num_heads=6, num_kv_heads=2, head_dim=4, hidden=24, intermediate=36, layers=2, tie=tie, bias=bias)
    spec = spec_from_model_config(model.config, 0.2)
    assert spec.params_total == sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    assert spec.params_layers == layer_params


# ---------------------------------------------------------------- SmolLM2, every solver


@pytest.mark.parametrize("solver", PER_LAYER_SOLVERS)
def test_smollm2_every_solver_meets_budget_and_constraints(solver):
    spec = smollm2_spec(0.25, protected=(0, 29), mlp_step=8, max_rate=0.8)
    res = allocate(spec, solver)
    check_result(spec, res, budget=solver != "seed")
    assert res.solver == solver
    assert res.granule == 8 * 3 * 576  # one MLP step of 8 channels, smaller than a KV group
    assert "protected" in res.binding
    if solver == "seed":
        assert res.actual_ratio < 0.25  # floors make the reference mapping miss the target


def test_dp_is_best_and_greedy_lagrange_close_on_smollm2():
    spec = smollm2_spec(0.3)
    dp = allocate(spec, "dp")
    for solver in ("greedy", "lagrange", "uniform"):
        res = allocate(spec, solver)
        if res.granule == dp.granule:
            assert res.objective >= dp.objective - 1e-9
    assert allocate(spec, "greedy").objective == pytest.approx(dp.objective, rel=1e-3)


def test_uniform_layer_rate_llm_pruner_semantics():
    spec = smollm2_spec(0.0, layer_rate=0.25, attn_layer_start=3, attn_layer_end=30, mlp_layer_start=3, mlp_layer_end=30)
    res = allocate(spec, "uniform")
    for l, la in enumerate(res.layers):
        if l < 3:
            assert (la.kv_groups_kept, la.mlp_kept) == (3, 1536)
        else:
            assert la.kv_groups_kept == 3 - math.floor(0.25 * 3)  # floor(0.75) = 0 groups pruned
            assert la.mlp_kept == 1536 - math.floor(0.25 * 1536)
    check_result(spec, res, budget=False)


def test_infeasible_names_binding_constraints():
    with pytest.raises(InfeasibleError, match=r"ratio 0.9 needs .*protected layers \[0, 29\].*min_kv_groups=1.*allow at most"):
        allocate(smollm2_spec(0.9, protected=(0, 29)), "dp")


def test_tie_keeps_attention_and_mlp_fractions_together():
    spec = smollm2_spec(0.3, tie=True, mlp_step=8)
    for solver in PER_LAYER_SOLVERS:
        res = allocate(spec, solver)
        check_result(spec, res, budget=solver != "seed")
        assert "tie" in res.binding


# ---------------------------------------------------------------- brute force (hypothesis)


def brute_force(spec: AllocationSpec, lo: int, hi: int) -> float | None:
    per_layer = []
    for l, s in enumerate(spec.layers):
        opts = [
            (s.params() - s.params(g, f), layer_loss(spec, l, g, f))
            for g in range(s.num_kv_heads + 1)
            for f in range(s.intermediate + 1)
            if layer_ok(spec, l, g, f)
        ]
        per_layer.append(opts)
    best = None
    for combo in itertools.product(*per_layer):
        removed = sum(r for r, _ in combo)
        if lo <= removed <= hi:
            loss = sum(x for _, x in combo)
            best = loss if best is None or loss < best else best
    return best


@st.composite
def tiny_specs(draw):
    n = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    r = draw(st.sampled_from([1, 3, 4]))
    inter = draw(st.integers(1, 6))
    step = draw(st.integers(1, 3))
    shape = LayerShape(hidden=draw(st.integers(1, 3)), num_q_heads=hkv * r, num_kv_heads=hkv, head_dim=draw(st.integers(1, 2)), intermediate=inter, norm_params=2,
                       group_norm=draw(st.booleans()))
    use_curves = draw(st.booleans())
    kw = {}
    if use_curves:
        nf = math.ceil(inter / step)
        kw["attn_curves"] = [np.array(draw(st.lists(st.floats(0, 5), min_size=hkv + 1, max_size=hkv + 1))) for _ in range(n)]
        kw["mlp_curves"] = [np.array(draw(st.lists(st.floats(0, 5), min_size=nf + 1, max_size=nf + 1))) for _ in range(n)]
    else:
        kw["importance"] = np.array(draw(st.lists(st.floats(0, 5), min_size=n, max_size=n)))
    # dyadic ratios of odd totals land exactly on a half, where the rounding rule decides
    return AllocationSpec(
        ratio=draw(st.one_of(st.floats(0.0, 0.9), st.sampled_from([0.125, 0.25, 0.375, 0.5, 0.625, 0.75]))),
        layers=[shape] * n,
        extra_params=draw(st.integers(0, 30)),
        mlp_step=step,
        min_kv_groups=draw(st.integers(0, 1)),
        protected=tuple(draw(st.sets(st.integers(0, n - 1), max_size=1))),
        max_rate=draw(st.sampled_from([1.0, 0.7, 0.5])),
        tie=draw(st.booleans()),
        **kw,
    )


@settings(max_examples=60, deadline=None)
@given(tiny_specs())
def test_solvers_against_brute_force(spec):
    t = target_of(spec.ratio, spec.params_total)
    try:
        dp = allocate(spec, "dp")
    except InfeasibleError:
        # dp refuses only a budget no allocation meets, and the other exact-budget solvers agree
        assert brute_force(spec, t, 10**18) is None
        assert all(allocate_raises(spec, s) for s in PER_LAYER_SOLVERS if s != "seed")
        return
    check_result(spec, dp)
    bf = brute_force(spec, t, t + dp.granule)
    assert bf is not None and dp.objective == pytest.approx(bf, rel=1e-9, abs=1e-9)
    for solver in PER_LAYER_SOLVERS:
        res = allocate(spec, solver)
        check_result(spec, res, budget=solver != "seed")
        assert allocate(spec, solver).layers == res.layers  # deterministic


def allocate_raises(spec: AllocationSpec, solver: str) -> bool:
    try:
        allocate(spec, solver)
    except InfeasibleError:
        return True
    return False


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change,field",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"importance": np.r_[np.ones(29), np.nan]}, "attn_importance[29]"),
        ({"importance": np.r_[-1.0, np.ones(29)]}, "attn_importance[0]"),
        ({"importance": np.ones(29)}, "attn_importance"),
        ({"min_rate": 0.6, "max_rate": 0.5}, "min_attn_rate"),
        ({"min_mlp_rate": 0.6, "max_mlp_rate": 0.5}, "min_mlp_rate"),
        ({"protected": (31,)}, "protected"),
        ({"mlp_step": 0}, "mlp_step"),
        ({"attn_curves": [np.zeros(4)] * 30, "mlp_curves": [np.zeros(5)] * 30}, "mlp_curves[0]"),
        ({"alpha": 0.0}, "alpha"),
    ],
)
def test_invalid_input_names_field(change, field):
    spec = smollm2_spec(0.2)
    for k, v in change.items():
        setattr(spec, k, v)
    with pytest.raises(InvalidInputError) as err:
        allocate(spec, "dp")
    assert field in str(err.value)
    assert not isinstance(err.value, InfeasibleError)


@pytest.mark.parametrize("shape,field", [
    (LayerShape(576, 9, 0, 64, 1536), "num_kv_heads"),
    (LayerShape(576, 10, 3, 64, 1536), "num_q_heads"),
])  # fmt: skip
def test_bad_shapes(shape, field):
    spec = AllocationSpec(ratio=0.2, layers=[shape], importance=np.ones(1))
    with pytest.raises(InvalidInputError, match=field):
        allocate(spec, "greedy")


def test_unknown_solver_and_missing_objective():
    with pytest.raises(InvalidInputError, match="solver"):
        allocate(smollm2_spec(), "simplex")
    spec = spec_from_model_config(SMOLLM2_CONFIG, 0.2)
    with pytest.raises(InvalidInputError, match="importance"):
        allocate(spec, "dp")
    res = allocate(spec, "uniform")  # uniform needs no objective
    check_result(spec, res)


# ---------------------------------------------------------------- JSON and CLI


def test_spec_json_round_trip(tmp_path):
    spec = smollm2_spec(0.25, protected=(0,), mlp_step=64, tie=True)
    data = spec_to_json(spec)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    back = load_spec(path)
    assert spec_to_json(back) == data
    assert allocate(back, "dp").layers == allocate(spec, "dp").layers


def test_spec_json_with_curves_and_errors():
    spec = smollm2_spec(0.2, importance=None, attn_curves=[np.array([3.0, 2.0, 1.0, 0.0])] * 30, mlp_curves=[np.linspace(1, 0, 1537)] * 30)
    back = spec_from_json(spec_to_json(spec))
    assert np.array_equal(back.mlp_curves[3], spec.mlp_curves[3])
    data = spec_to_json(spec)
    del data["layers"][2]["head_dim"]
    with pytest.raises(InvalidInputError, match=r"layers\[2\].head_dim"):
        spec_from_json(data)
    with pytest.raises(InvalidInputError, match="unknown"):
        spec_from_json({**spec_to_json(spec), "ratoi": 0.1})


def test_cli_allocate(tmp_path, capsys):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec_to_json(smollm2_spec(0.25, mlp_step=8))))
    out = tmp_path / "out" / "alloc.json"
    assert cli_main(["allocate", "--spec", str(spec_path), "--solver", "greedy", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "actual_ratio" in table and "kv_kept" in table
    data = json.loads(out.read_text())
    assert set(data) >= {"layers", "params_before", "params_after", "actual_ratio", "actual_ratio_layers", "objective", "solver", "solve_seconds", "binding"}
    assert set(data["layers"][0]) >= {"kv_groups_kept", "q_heads_kept", "mlp_kept", "attn_rate", "mlp_rate"}
    assert data["solver"] == "greedy" and data["params_before"] == 134_515_008
    assert not list(out.parent.glob(".*.tmp"))

    assert cli_main(["allocate", "--spec", str(spec_path), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["solver"] == "dp"


def test_cli_spec_from_model_folder(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    out = tmp_path / "spec.json"
    assert cli_main(["allocate", "--spec-from-model", str(model_dir), "--ratio", "0.3", "--json", str(out)]) == 0
    spec = load_spec(out)
    assert spec.params_total == 134_515_008 and spec.ratio == 0.3
    assert "134,515,008" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ratio": 1.5, "layers": [{"hidden": 4, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 2, "intermediate": 8, "importance": 1.0}]}))
    assert cli_main(["allocate", "--spec", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio" in err[0] and "InvalidInputError" in err[0]
    assert cli_main(["allocate", "--spec", str(tmp_path / "missing.json")]) == 2


# ---------------------------------------------------------------- budget rounding (issue 11, item 2)


def twenty_five_params(ratio: float | None = 0.5, **kw) -> AllocationSpec:
    """Three layers of 7 parameters (attention 4 with d = hd = r = 1, MLP 3) and 4 outside them: 25 in all."""
    kw.setdefault("importance", np.array([1.0, 2.0, 3.0]))
    return AllocationSpec(ratio=ratio, layers=[LayerShape(1, 1, 1, 1, 1)] * 3, extra_params=4, min_kv_groups=0,
                          min_mlp=0, **kw)


@pytest.mark.parametrize("solver", ["uniform", "greedy", "lagrange", "dp"])
def test_budget_target_rounds_half_away_from_zero(solver):
    spec = twenty_five_params(0.5)
    assert spec.params_total == 25 and 0.5 * 25 == 12.5
    res = allocate(spec, solver)
    assert res.target_removed == 13  # half away from zero; half to even (Python's round) would say 12
    assert round(12.5) == 12 and target_count(0.5, 25) == 13 == half_away_from_zero(12.5)
    check_result(spec, res)


@settings(max_examples=200, deadline=None)
@given(st.integers(7, 10**12), st.one_of(st.sampled_from([0.5, 0.25, 0.125, 0.375, 0.75, 0.0625]), st.floats(0.0, 0.99)))
def test_target_count_is_the_rust_rule(total, ratio):
    """Python's target_count, the independent rule above and the Rust solvers agree, halves included
    (`layer_rate` reports the target without needing it to be reachable)."""
    spec = AllocationSpec(ratio=ratio, layers=[LayerShape(1, 1, 1, 1, 1)], extra_params=total - 7, layer_rate=0.0)
    assert allocate(spec, "uniform").target_removed == target_count(ratio, total) == half_away_from_zero(ratio * total)


# ---------------------------------------------------------------- KV-cache and FLOPs bounds


def layer_kv_flops(spec: AllocationSpec, l: int, g: int, f: int) -> tuple[int, int]:
    """KV-cache bytes and FLOPs per token of layer l keeping g KV groups and f channels, from the tensors: K and V
    rows of head_dim per kept KV head cached; 2 FLOPs per multiply-add of every projection weight, of Q.K^T and
    of A.V over flops_seq_len positions."""
    s = spec.layers[l]
    q = g * (s.num_q_heads // s.num_kv_heads)
    d, hd = s.hidden, s.head_dim
    weights = {"q_proj": q * hd * d, "k_proj": g * hd * d, "v_proj": g * hd * d, "o_proj": d * q * hd,
               "gate_proj": f * d, "up_proj": f * d, "down_proj": d * f}
    return 2 * g * hd * spec.kv_cache_dtype_bytes, 2 * sum(weights.values()) + 2 * 2 * q * hd * spec.flops_seq_len


def kv_flops_totals(spec: AllocationSpec, kept: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    kept = kept or [(s.num_kv_heads, s.intermediate) for s in spec.layers]
    pairs = [layer_kv_flops(spec, l, g, f) for l, (g, f) in enumerate(kept)]
    return sum(p[0] for p in pairs), spec.extra_flops + sum(p[1] for p in pairs)


def brute_force_bounds(spec: AllocationSpec, window: tuple[int, int] | None) -> float | None:
    """Least objective over every combination in the parameter window (None: no window) that removes at least
    the KV-cache and FLOPs targets; None if none does."""
    kv_total, fl_total = kv_flops_totals(spec)
    kv_min = None if spec.kv_cache_ratio is None else target_of(spec.kv_cache_ratio, kv_total)
    fl_min = None if spec.flops_ratio is None else target_of(spec.flops_ratio, fl_total)
    per_layer = []
    for l, s in enumerate(spec.layers):
        full_kv, full_fl = layer_kv_flops(spec, l, s.num_kv_heads, s.intermediate)
        opts = []
        for g in range(s.num_kv_heads + 1):
            for f in range(s.intermediate + 1):
                if layer_ok(spec, l, g, f):
                    kv, fl = layer_kv_flops(spec, l, g, f)
                    opts.append((s.params() - s.params(g, f), full_kv - kv, full_fl - fl, layer_loss(spec, l, g, f)))
        per_layer.append(opts)
    best = None
    for combo in itertools.product(*per_layer):
        p, kv, fl = (sum(c[k] for c in combo) for k in range(3))
        if window is not None and not window[0] <= p <= window[1]:
            continue
        if (kv_min is not None and kv < kv_min) or (fl_min is not None and fl < fl_min):
            continue
        loss = sum(c[3] for c in combo)
        best = loss if best is None or loss < best else best
    return best


def check_bounds(spec: AllocationSpec, res) -> None:
    """Reported KV-cache / FLOPs counts equal the independent ones, and every bound holds."""
    kv_total, fl_total = kv_flops_totals(spec)
    kv, fl = kv_flops_totals(spec, [(la.kv_groups_kept, la.mlp_kept) for la in res.layers])
    assert (res.kv_cache_bytes_before, res.kv_cache_bytes_after, res.flops_before, res.flops_after) == (kv_total, kv, fl_total, fl)
    assert res.actual_kv_cache_ratio == pytest.approx(1 - kv / kv_total)
    assert res.actual_flops_ratio == pytest.approx(1 - fl / fl_total)
    if spec.kv_cache_ratio is not None:
        assert res.target_kv_cache_removed == target_of(spec.kv_cache_ratio, kv_total)
        assert kv_total - kv >= res.target_kv_cache_removed, res.solver
    if spec.flops_ratio is not None:
        assert res.target_flops_removed == target_of(spec.flops_ratio, fl_total)
        assert fl_total - fl >= res.target_flops_removed, res.solver


@st.composite
def bounded_specs(draw):
    """tiny_specs with one, two or three budgets; `relative`: KV-cache / FLOPs ratios scaled from what the
    parameter budget alone achieves, so that combinations are often feasible."""
    spec = draw(tiny_specs())
    ratio_on, kv_on, fl_on = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any))
    spec.ratio = spec.ratio if ratio_on else None
    spec.kv_cache_ratio = draw(st.floats(0.0, 0.6)) if kv_on else None
    spec.flops_ratio = draw(st.floats(0.0, 0.6)) if fl_on else None
    spec.flops_seq_len = draw(st.integers(1, 8))
    spec.kv_cache_dtype_bytes = draw(st.sampled_from([1, 2, 4]))
    spec.extra_flops = draw(st.integers(0, 40))
    return spec, draw(st.booleans())


@settings(max_examples=120, deadline=None)
@given(bounded_specs())
def test_dp_equals_brute_force_with_one_and_two_bounds(case):
    from layerprune.allocation.references import build_knapsack

    spec, relative = case
    if relative and spec.ratio is not None:
        alone = dataclasses.replace(spec, kv_cache_ratio=None, flops_ratio=None)
        try:
            base = allocate(alone, "dp")
        except InfeasibleError:
            base = None
        if base is not None:
            if spec.kv_cache_ratio is not None:
                spec.kv_cache_ratio = min(0.99, base.actual_kv_cache_ratio * (0.6 + spec.kv_cache_ratio))
            if spec.flops_ratio is not None:
                spec.flops_ratio = min(0.99, base.actual_flops_ratio * (0.6 + spec.flops_ratio))
    t = None if spec.ratio is None else target_of(spec.ratio, spec.params_total)
    try:
        dp = allocate(spec, "dp")
    except InfeasibleError as err:
        assert "\n" not in str(err)
        wide = build_knapsack(spec).params_window_wide
        assert brute_force_bounds(spec, wide) is None, str(err)
        for solver in ("greedy", "lagrange"):
            assert allocate_raises(spec, solver)
        return
    check_result(spec, dp)
    check_bounds(spec, dp)
    bf = brute_force_bounds(spec, None if t is None else (t, t + dp.granule))
    assert bf is not None and dp.objective == pytest.approx(bf, rel=1e-9, abs=1e-9)
    assert dp.proven_optimal and dp.lower_bound == dp.objective
    lagrangian = allocate(dataclasses.replace(spec, dp_method="lagrangian"), "dp")
    check_bounds(spec, lagrangian)
    if lagrangian.granule == dp.granule:
        assert lagrangian.objective >= dp.objective - 1e-9 and lagrangian.lower_bound <= dp.objective + 1e-9
    for solver in ("greedy", "lagrange", "uniform"):
        if spec.ratio is None and solver == "uniform":
            with pytest.raises(InvalidInputError, match="ratio"):
                allocate(spec, solver)
            continue
        try:
            res = allocate(spec, solver)
        except InfeasibleError:
            continue  # a heuristic may miss a feasible combination; dp never does
        check_result(spec, res)
        check_bounds(spec, res)
        if res.granule == dp.granule:
            assert res.objective >= dp.objective - 1e-9 * (1 + abs(dp.objective))


def test_infeasible_combination_is_one_line_naming_the_bounds():
    spec = smollm2_spec(0.05, kv_cache_ratio=0.6)  # 54 of 90 KV groups: 15.9M parameters, far above 5% (6.7M)
    with pytest.raises(InfeasibleError) as err:
        allocate(spec, "dp")
    msg = str(err.value)
    assert "\n" not in msg
    assert "ratio 0.05 and kv_cache_ratio 0.6 cannot hold together" in msg and "at least 15.93M params" in msg
    for solver in ("greedy", "lagrange", "uniform"):
        with pytest.raises(InfeasibleError, match="kv_cache_ratio 0.6"):
            allocate(spec, solver)
    with pytest.raises(InfeasibleError, match=r"flops_ratio 0.9 needs .* FLOPs per token removed"):
        allocate(smollm2_spec(None, flops_ratio=0.9), "dp")
    with pytest.raises(InvalidInputError, match="seed"):
        allocate(smollm2_spec(0.25, kv_cache_ratio=0.3), "seed")
    with pytest.raises(InvalidInputError, match="no budget"):
        allocate(smollm2_spec(None), "dp")


def test_kv_bound_at_the_same_size_moves_pruning_into_attention():
    plain = allocate(smollm2_spec(0.25), "dp")
    spec = smollm2_spec(0.25, kv_cache_ratio=round(plain.actual_kv_cache_ratio + 0.2, 2), flops_ratio=0.3)
    for solver in ("dp", "greedy", "lagrange", "uniform"):
        res = allocate(spec, solver)
        check_result(spec, res)
        check_bounds(spec, res)
        assert res.actual_kv_cache_ratio >= spec.kv_cache_ratio and res.actual_flops_ratio >= 0.3
    dp = allocate(spec, "dp")
    assert dp.proven_optimal and dp.objective >= plain.objective and {"kv_cache_ratio", "flops_ratio"} & set(dp.binding)
    # the same parameter count, within one granule
    assert abs(dp.params_removed - plain.params_removed) <= dp.granule


def test_spec_json_round_trip_with_bounds_and_meta(tmp_path):
    spec = smollm2_spec(None, kv_cache_ratio=0.4, flops_ratio=0.2, flops_seq_len=512, kv_cache_dtype_bytes=4)
    data = spec_to_json(spec)
    assert data["ratio"] is None and data["kv_cache_ratio"] == 0.4 and data["extra_flops"] == 2 * 49152 * 576
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**data, "meta": {"best_known_objective": 1.0}}))
    back = load_spec(path)
    assert spec_to_json(back) == data
    res = allocate(back, "dp")
    assert res.target_removed is None and res.flops_seq_len == 512
    check_bounds(back, res)
    with pytest.raises(InvalidInputError, match="meta"):
        spec_from_json({**data, "meta": [1]})


def test_cli_allocate_reports_the_three_ratios(tmp_path, capsys):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec_to_json(smollm2_spec(0.25, mlp_step=8, kv_cache_ratio=0.5))))
    assert cli_main(["allocate", "--spec", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "actual_kv_cache_ratio" in out and "actual_flops_ratio" in out and "proven optimal" in out
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    target = tmp_path / "bounded.json"
    assert cli_main(["allocate", "--spec-from-model", str(model_dir), "--ratio", "0.2", "--kv-cache-ratio", "0.5",
                     "--flops-ratio", "0.25", "--flops-seq-len", "1024", "--json", str(target)]) == 0
    spec = load_spec(target)
    assert (spec.ratio, spec.kv_cache_ratio, spec.flops_ratio, spec.flops_seq_len) == (0.2, 0.5, 0.25, 1024)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec_to_json(smollm2_spec(0.05, kv_cache_ratio=0.6))))
    capsys.readouterr()
    assert cli_main(["allocate", "--spec", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ratio 0.05 and kv_cache_ratio 0.6 cannot hold together" in err[0]
