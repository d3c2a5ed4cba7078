"""`prune` with KV-cache and FLOPs budgets on tiny random models: the bounds hold at the same parameter budget, and
the KV-cache and FLOPs counts of the pruned model equal what its modules measure (the cache a forward pass returns,
and torch's FLOP counter over that forward)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_tiny_llama
from layerprune.arch import per_token_costs
from layerprune.errors import InfeasibleError, InvalidInputError
from layerprune.models import count_parameters
from layerprune.pruning.pipeline import check_feasible, prune, summary_table
from families import plain_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQ = 16


def _model(seed: int = 0, **kw):
    # GQA 2:1 with 4 KV heads, so that a KV-cache budget has room below the parameter budget
    shape = dict(num_heads=8, num_kv_heads=4, head_dim=8, hidden=48, intermediate=96, layers=4, vocab=64, seed=seed)
    return make_tiny_llama(**{**shape, **kw})


def _ids(n: int = 4, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def measured_kv_cache_bytes(model: torch.nn.Module, seq: int = SEQ) -> int:
    """Bytes per token of the K and V tensors the model caches over a forward of `seq` tokens."""
    with torch.no_grad():
        out = model(input_ids=_ids(1, seq, seed=1), use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert total % seq == 0
    return total // seq


def measured_flops(model: torch.nn.Module, seq: int = SEQ) -> int:
    """FLOPs per token torch's FLOP counter measures over a forward of `seq` tokens (the whole model)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=_ids(1, seq, seed=2), use_cache=False)
    total = counter.get_total_flops()
    assert total % seq == 0
    return total // seq


def test_formulas_equal_the_measured_counts_of_a_dense_model():
    model = _model()
    costs = per_token_costs(model, SEQ)
    assert costs["kv_cache_bytes"] == measured_kv_cache_bytes(model)
    assert costs["flops"] == measured_flops(model)


@pytest.mark.parametrize("solver,mode", [("dp", "unbalanced"), ("greedy", "unbalanced"), (None, "uniform")])
def test_pruned_model_meets_the_bounds_and_its_counts_are_measured(solver, mode):
    model = _model()
    extra = {"solver": solver} if solver else {"match_params": True}
    config = plain_config(ratio=0.2, mode=mode, layer_importance="removal", kv_cache_ratio=0.5, flops_ratio=0.22,
                         flops_seq_len=SEQ, **extra)
    result = prune(model, None, config, calib_ids=_ids(), progress=False)
    rep, alloc, pruned = result.report, result.allocation, result.model
    # the same parameter budget as without the bounds
    removed = count_parameters(model)["total"] - count_parameters(pruned)["total"]
    assert alloc.target_removed <= removed <= alloc.target_removed + alloc.granule
    # every bound holds, and the report's counts are the modules' own
    kv, flops = rep["kv_cache_bytes_per_token"], rep["flops_per_token"]
    assert kv["before"] == measured_kv_cache_bytes(model) and kv["after"] == measured_kv_cache_bytes(pruned)
    assert flops["before"] == measured_flops(model) and flops["after"] == measured_flops(pruned)
    assert flops["seq_len"] == SEQ and kv["dtype_bytes"] == 4
    assert rep["actual_kv_cache_ratio"] == pytest.approx(1 - kv["after"] / kv["before"])
    assert rep["actual_flops_ratio"] == pytest.approx(1 - flops["after"] / flops["before"])
    assert rep["actual_kv_cache_ratio"] >= 0.5 and rep["actual_flops_ratio"] >= 0.22
    assert (rep["target_kv_cache_ratio"], rep["target_flops_ratio"]) == (0.5, 0.22)
    assert (alloc.kv_cache_bytes_after, alloc.flops_after) == (kv["after"], flops["after"])
    table = summary_table(rep)
    assert "actual KV-cache ratio" in table and "actual FLOPs ratio at 16 positions" in table


def test_bounds_change_the_allocation_at_the_same_size():
    model = _model()
    plain = prune(model, None, plain_config(ratio=0.2, layer_importance="removal", flops_seq_len=SEQ),
                  calib_ids=_ids(), progress=False)
    kv_goal = min(0.75, round(plain.report["actual_kv_cache_ratio"] + 0.25, 2))
    bounded = prune(model, None, plain_config(ratio=0.2, layer_importance="removal", kv_cache_ratio=kv_goal,
                                             flops_seq_len=SEQ), calib_ids=_ids(), progress=False)
    assert bounded.report["actual_kv_cache_ratio"] >= kv_goal > plain.report["actual_kv_cache_ratio"]
    assert abs(bounded.allocation.params_after - plain.allocation.params_after) <= bounded.allocation.granule


def test_an_infeasible_combination_fails_before_any_work_in_one_line():
    model = _model()
    config = plain_config(ratio=0.05, layer_importance="removal", kv_cache_ratio=0.7)
    with pytest.raises(InfeasibleError) as err:
        check_feasible(model.config, config)
    assert "\n" not in str(err.value) and "ratio 0.05 and kv_cache_ratio 0.7 cannot hold together" in str(err.value)


@pytest.mark.parametrize("config,match", [
    (dict(mode="unbalanced", solver="seed", kv_cache_ratio=0.3), "seed"),
    (dict(mode="uniform", kv_cache_ratio=0.3), "match_params"),
    (dict(mode="flap", flops_ratio=0.3), "flap"),
    (dict(kv_cache_ratio=1.0), "kv_cache_ratio"),
    (dict(flops_ratio=0.2, flops_seq_len=0), "flops_seq_len"),
])  # fmt: skip
def test_bounds_are_refused_where_a_method_cannot_meet_them(config, match):
    from layerprune.pruning.config import validate_config

    with pytest.raises(InvalidInputError, match=match):
        validate_config(plain_config(ratio=0.2, **config))


def test_compare_passes_the_bounds_to_the_methods_on_an_exact_budget():
    from layerprune.compare.settings import METHODS, CompareSettings, prune_config, takes_bounds

    settings = CompareSettings(ratios=(0.2,), kv_cache_ratio=0.4, flops_ratio=0.3, flops_seq_len=512)
    bounded = set()
    for method in METHODS[1:]:
        config = prune_config(method, 0.2, settings, 8)
        assert config.flops_seq_len == 512
        want = (0.4, 0.3) if takes_bounds(config) else (None, None)
        assert (config.kv_cache_ratio, config.flops_ratio) == want, method
        bounded |= {method} if takes_bounds(config) else set()
    assert {"uniform", "unbalanced"} <= bounded and not {"uniform-range", "unbalanced-seed"} & bounded


@pytest.mark.parametrize("argv,flag", [
    (["compare", "--ratio", "0.2", "--kv-cache-ratio", "1.5"], "--kv-cache-ratio"),
    (["compare", "--ratio", "0.2", "--flops-ratio", "0.3", "--flops-seq-len", "0"], "--flops-seq-len"),
    (["prune", "--ratio", "0.2", "--flops-ratio", "0.3", "--solver", "seed"], "seed"),
    (["prune", "--ratio", "0.2", "--kv-cache-ratio", "0.3", "--mode", "uniform"], "match_params"),
])  # fmt: skip
def test_cli_refuses_bad_bounds_in_one_line_before_loading(tmp_path, capsys, argv, flag):
    from layerprune.cli import main as cli_main

    assert cli_main([argv[0], "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
