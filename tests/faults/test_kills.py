"""A run killed (SIGKILL, as a pre-empted job is) at each fault point of each command.

At every point: the process died there; no output folder (or file) is left half-written, only the whole old one or
none; the input model is unchanged byte for byte; and the same command run again succeeds and writes what an
uninterrupted run writes. ``LAYERPRUNE_FAULT=NAME[:N]`` names the point (layerprune.faults).
"""

from __future__ import annotations

import json
import shutil

import pytest
from faults.harness import RESULT_FILES, digest, leftovers

CALIB = ["--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"]


def prune_argv(model, out, *extra):
    return ["prune", "--model", model, "--ratio", "0.25", "--out", out, *CALIB, *extra]


# (command, fault point, which visit): every phase of both executors and of the save
PRUNE_POINTS = [
    ("memory", "calibration", 1),
    ("memory", "layer", 2),
    ("memory", "save-file", 1),
    ("memory", "save-file", 3),
    ("memory", "folder-swap-start", 1),
    ("layers", "calibration", 1),
    ("layers", "layer", 2),
    ("layers", "layer", 5),
    ("layers", "save-file", 1),
    ("layers", "save-file", 3),
    ("layers", "folder-swap-start", 1),
]
EXECUTOR_FLAGS = {"memory": [], "layers": ["--sequential"]}


@pytest.fixture(scope="module")
def references(runner, checkpoint, tmp_path_factory):
    """What an uninterrupted run writes, for each executor."""
    root = tmp_path_factory.mktemp("reference")
    refs = {}
    for executor, flags in EXECUTOR_FLAGS.items():
        out = root / executor
        result = runner.one(prune_argv(checkpoint, out, *flags))
        assert result["exit"] == 0, result["log"][-3000:]
        refs[executor] = digest(out, RESULT_FILES)
    return refs


def _killed_then_rerun(runner, argv, out, point, nth, before_input, checkpoint, **job):
    killed = runner.one(argv, env={"LAYERPRUNE_FAULT": f"{point}:{nth}"}, **job)
    assert killed["exit"] == -9, f"not killed at {point}:{nth}: exit {killed['exit']}\n{killed['log'][-3000:]}"
    assert digest(checkpoint) == before_input  # the input is never written
    rerun = runner.one(argv)
    assert rerun["exit"] == 0, rerun["log"][-3000:]
    assert leftovers(out) == []  # what the killed writer left beside --out is cleaned up by the next
    assert digest(checkpoint) == before_input
    return killed


@pytest.mark.parametrize(("executor", "point", "nth"), PRUNE_POINTS, ids=[f"{e}-{p}-{n}" for e, p, n in PRUNE_POINTS])
def test_prune_killed_leaves_no_folder_and_reruns_to_the_same_weights(runner, checkpoint, references, tmp_path,
                                                                      executor, point, nth):
    before = digest(checkpoint)
    out = tmp_path / "out"
    argv = prune_argv(checkpoint, out, *EXECUTOR_FLAGS[executor])
    killed = runner.one(argv, env={"LAYERPRUNE_FAULT": f"{point}:{nth}"})
    assert killed["exit"] == -9, f"not killed at {point}:{nth}: exit {killed['exit']}\n{killed['log'][-3000:]}"
    assert not out.exists()  # nothing half-written: the folder appears whole, at the end, or not at all
    assert digest(checkpoint) == before
    rerun = runner.one(argv)
    assert rerun["exit"] == 0, rerun["log"][-3000:]
    assert digest(out, RESULT_FILES) == references[executor]
    assert leftovers(out) == [] and digest(checkpoint) == before


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_overwrite_killed_in_the_swap_keeps_the_old_folder_whole(runner, checkpoint, references, tmp_path, exchange):
    """--overwrite of a finished folder, killed while the new one is swapped in: with an atomic exchange the old
    folder stays; without one (two renames), the old folder is aside and the next write puts it back first."""
    before = digest(checkpoint)
    out = tmp_path / "out"
    old = runner.one(prune_argv(checkpoint, out, "--ratio", "0.4"))
    assert old["exit"] == 0, old["log"][-3000:]
    old_digest = digest(out)
    argv = prune_argv(checkpoint, out, "--overwrite")
    point = "folder-swap-start" if exchange else "folder-swap"
    killed = runner.one(argv, env={"LAYERPRUNE_FAULT": point}, no_exchange=not exchange)
    assert killed["exit"] == -9, killed["log"][-3000:]
    if exchange:
        assert digest(out) == old_digest
    else:  # between the renames: the old folder whole, aside
        assert not out.exists()
        aside = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.old-")]
        assert len(aside) == 1 and digest(aside[0]) == old_digest
    rerun = runner.one(argv, no_exchange=not exchange)
    assert rerun["exit"] == 0, rerun["log"][-3000:]
    assert digest(out, RESULT_FILES) == references["memory"]
    assert leftovers(out) == [] and digest(checkpoint) == before


@pytest.fixture(scope="module")
def pruned(runner, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "pruned"
    result = runner.one(prune_argv(checkpoint, out))
    assert result["exit"] == 0, result["log"][-3000:]
    return out


@pytest.mark.parametrize("nth", [1, 7])
def test_export_killed_leaves_no_file_and_reruns_to_the_same_bytes(runner, pruned, tmp_path, nth):
    before = digest(pruned)
    reference = tmp_path / "reference.gguf"
    assert runner.one(["export", "--model", pruned, "--out", reference, "--no-progress"])["exit"] == 0
    out = tmp_path / "model.gguf"
    argv = ["export", "--model", pruned, "--out", out, "--no-progress"]
    killed = runner.one(argv, env={"LAYERPRUNE_FAULT": f"gguf-tensor:{nth}"})
    assert killed["exit"] == -9 and not out.exists()
    assert runner.one(argv)["exit"] == 0
    assert out.read_bytes() == reference.read_bytes()
    assert digest(pruned) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


COMPARE = ["--ratio", "0.25", "--methods", "dense,uniform,unbalanced", "--max-tokens", "512", "--no-generate",
           "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"]


def _runs(out):
    return {p.name: json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))}


def _measures(runs):
    return {name: (run.get("ppl"), run.get("params")) for name, run in runs.items()}


@pytest.fixture(scope="module")
def compare_reference(runner, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "reference"
    result = runner.one(["compare", "--model", checkpoint, "--out", out, *COMPARE])
    assert result["exit"] == 0, result["log"][-3000:]
    return _measures(_runs(out))


@pytest.mark.parametrize(("point", "nth"), [("compare-run", 2), ("compare-stored", 1), ("layer", 3)])
def test_compare_killed_resumes_reusing_every_finished_run(runner, checkpoint, compare_reference, tmp_path, point, nth):
    before = digest(checkpoint)
    out = tmp_path / "compare"
    argv = ["compare", "--model", checkpoint, "--out", out, *COMPARE]
    killed = runner.one(argv, env={"LAYERPRUNE_FAULT": f"{point}:{nth}"})
    assert killed["exit"] == -9, killed["log"][-3000:]
    finished = _runs(out)
    assert finished and len(finished) < len(compare_reference)  # some runs were stored, whole (JSON that parses)
    rerun = runner.one(argv)
    assert rerun["exit"] == 0, rerun["log"][-3000:]
    reused = [line for line in rerun["log"].splitlines() if "reusing" in line]
    assert len(reused) == len(finished), rerun["log"][-3000:]
    assert _measures(_runs(out)) == compare_reference
    assert digest(checkpoint) == before


def test_compare_never_reuses_a_torn_run(runner, checkpoint, compare_reference, tmp_path):
    """A stored run cut short (as a copy interrupted by a full disk would leave it) is recomputed, not read."""
    out = tmp_path / "compare"
    argv = ["compare", "--model", checkpoint, "--out", out, *COMPARE]
    assert runner.one(argv)["exit"] == 0
    torn = next(p for p in sorted((out / "runs").rglob("*.json")) if "unbalanced" in p.name)
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    rerun = runner.one(argv)
    assert rerun["exit"] == 0, rerun["log"][-3000:]
    assert _measures(_runs(out)) == compare_reference
    assert not any("reusing" in line and "unbalanced" in line for line in rerun["log"].splitlines())


HEAL = ["--tokens", "2048", "--seq-len", "32", "--batch-size", "4", "--checkpoint-every", "4", "--no-progress"]


def test_heal_killed_in_a_checkpoint_write_resumes_to_the_same_weights(runner, checkpoint, pruned, tmp_path):
    before = digest(pruned), digest(checkpoint)
    reference = tmp_path / "reference"
    argv = ["heal", "--model", pruned, "--teacher", checkpoint, *HEAL]
    assert runner.one([*argv, "--out", reference])["exit"] == 0
    out = tmp_path / "healed"
    killed = runner.one([*argv, "--out", out], env={"LAYERPRUNE_FAULT": "heal-checkpoint-write:2"})
    assert killed["exit"] == -9 and not out.exists()
    rerun = runner.one([*argv, "--out", out, "--resume"])
    assert rerun["exit"] == 0, rerun["log"][-3000:]
    assert digest(out, ("model.safetensors",)) == digest(reference, ("model.safetensors",))
    assert (digest(pruned), digest(checkpoint)) == before
    shutil.rmtree(reference)
