"""One config: PruneConfig's defaults are the best measured method, and the CLI, `compare` and the Python API take
theirs from it. Filled for the executor that runs it, checked once, recorded in the report."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from families import CASES, make_model, plain_config, token_ids

from layerprune.cli import build_parser
from layerprune.cli.prune import config_from_args
from layerprune.compare import CompareSettings
from layerprune.compare.settings import prune_config
from layerprune.errors import InvalidInputError
from layerprune.pruning import DEFAULT_METHOD, PruneConfig, prune, resolve_config
from layerprune.pruning import config as config_module
from layerprune.pruning.config import EXECUTORS, FLAP_IMPORTANCE


def _cli_config(*flags: str) -> PruneConfig:
    args = build_parser().parse_args(["prune", "--model", "m", "--ratio", "0.25", "--out", "o", *flags])
    return config_from_args(args)


def test_the_python_default_is_the_best_measured_method():
    config = resolve_config(PruneConfig(ratio=0.25))
    assert (config.importance, config.layer_importance, config.refit) == (
        DEFAULT_METHOD["importance"], DEFAULT_METHOD["layer_importance"], DEFAULT_METHOD["refit"])
    assert (config.importance, config.layer_importance, config.refit) == ("obs", "reconstruction", "lstsq")


@pytest.mark.parametrize("executor", ["memory", "layers"])
def test_the_cli_default_is_the_python_default(executor):
    """`layerprune prune --ratio 0.25` and PruneConfig(ratio=0.25) are one config, field for field."""
    assert resolve_config(_cli_config(), executor) == resolve_config(PruneConfig(ratio=0.25), executor)


def test_compare_unbalanced_is_the_python_default():
    settings = CompareSettings(ratios=(0.25,))
    assert prune_config("unbalanced", 0.25, settings, num_layers=30) == resolve_config(PruneConfig(ratio=0.25))


def test_every_cli_flag_default_is_the_config_default():
    """Each prune flag that sets a config field defaults to that field's default (nothing decided in the CLI)."""
    args = build_parser().parse_args(["prune", "--model", "m", "--ratio", "0.25", "--out", "o"])
    for field in dataclasses.fields(PruneConfig):
        if field.init and field.default is not dataclasses.MISSING and field.name in vars(args):
            assert getattr(args, field.name) == field.default, field.name


def test_the_default_method_is_one_line(monkeypatch):
    """Changing DEFAULT_METHOD changes what an open config resolves to."""
    monkeypatch.setitem(config_module.DEFAULT_METHOD, "importance", "activation")
    monkeypatch.setitem(config_module.DEFAULT_METHOD, "layer_importance", "activation")
    config = resolve_config(PruneConfig(ratio=0.25))
    assert (config.importance, config.layer_importance) == ("activation", "activation")


@pytest.mark.parametrize("fields, executor, want", [
    ({}, "layers", ("obs", "sensitivity")),  # no whole-model backward layer by layer
    ({"refit": "none"}, "memory", ("taylor", "sensitivity")),  # OBS and the reconstruction curves need the refit
    ({"iterative_steps": 2}, "memory", ("taylor", "reconstruction")),  # OBS prunes in one step
    ({"importance": "l1"}, "memory", ("l1", "reconstruction")),  # what is given is kept
    ({"layer_importance": "removal"}, "layers", ("obs", "removal")),
])
def test_what_is_left_open_falls_back_where_the_default_cannot_run(fields, executor, want):
    config = resolve_config(PruneConfig(ratio=0.25, **fields), executor)
    assert (config.importance, config.layer_importance) == want


def test_what_cannot_run_is_refused_in_one_line_for_its_executor():
    with pytest.raises(InvalidInputError, match="--fsdp"):
        resolve_config(PruneConfig(ratio=0.25, importance="taylor"), "layers")
    with pytest.raises(InvalidInputError, match="backward pass through the whole model.*--fsdp"):
        resolve_config(PruneConfig(ratio=0.25, layer_importance="reconstruction"), "layers")
    with pytest.raises(InvalidInputError, match="importance 'taylor2' is not available layer by layer|backward"):
        resolve_config(PruneConfig(ratio=0.25, importance="taylor2"), "layers")
    with pytest.raises(InvalidInputError, match="executor"):
        resolve_config(PruneConfig(ratio=0.25), "gpu")
    with pytest.raises(InvalidInputError, match="ratio"):
        resolve_config(PruneConfig(ratio=1.5))


def test_flap_runs_in_both_executors_with_the_same_resolved_config():
    memory, layers = (resolve_config(PruneConfig(ratio=0.25, mode="flap", refit="bias"), e) for e in EXECUTORS)
    assert memory == layers and memory.importance == FLAP_IMPORTANCE  # the field FLAP never reads, one value


def test_a_resolved_config_is_checked_once_and_a_changed_one_again(monkeypatch):
    calls = []
    check = config_module._check_fields
    monkeypatch.setattr(config_module, "_check_fields", lambda c, e: (calls.append(e), check(c, e)))
    resolved = resolve_config(PruneConfig(ratio=0.25))
    assert calls == ["memory"]
    assert resolve_config(resolved) is resolved and calls == ["memory"]
    assert resolve_config(dataclasses.replace(resolved, ratio=0.3)).ratio == 0.3 and calls == ["memory"] * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.ratio = 0.5  # type: ignore[misc]


def test_prune_checks_the_config_once_and_records_how_it_ran(monkeypatch):
    calls = []
    check = config_module._check_fields
    monkeypatch.setattr(config_module, "_check_fields", lambda c, e: (calls.append(e), check(c, e)))
    model = make_model(CASES[0])
    result = prune(model, None, plain_config(ratio=0.2), calib_ids=token_ids(batch=4, length=16), progress=False)
    assert calls == ["memory"]
    run = result.report["run"]
    assert run == {"executor": "memory", "device": "cpu", "world_size": 1, "backend": None,
                   "threads": torch.get_num_threads()}
    assert result.report["config"]["importance"] == "taylor" and "_resolved_for" not in result.report["config"]


def test_timings_wait_for_the_device(monkeypatch):
    """CUDA runs asynchronously: every stage clock of both executors synchronises a CUDA device, never the CPU."""
    from layerprune.pruning import pipeline
    from layerprune.pruning.sequential import _Clock

    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(str(device)))
    pipeline.device_time("cpu")
    pipeline.device_time(None)
    assert synced == []
    pipeline.device_time("cuda:1")
    assert synced == ["cuda:1"]
    clock = _Clock(torch.device("cuda", 0))
    with clock("outer"), clock("inner"):
        pass
    assert synced == ["cuda:1"] + ["cuda:0"] * 4 and set(clock.totals) == {"outer", "inner"}
