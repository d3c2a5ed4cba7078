"""Benchmarks stay runnable: they are off the default path, so a refactor could break them silently.
These tests run them (or their argument parsing) and check the JSON schema; they assert nothing on time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

from layerprune.report.plots import is_png

BENCHES = REPO_ROOT / "benches"


@pytest.mark.parametrize("script", ["bench_scoring.py", "bench_scoring_memory.py", "bench_solvers.py",
                                    "bench_sequential.py", "bench_prune.py", "calibration_study.py", "api_vs_cli.py",
                                    "empty_blocks_study.py", "bench_heal.py"])
def test_bench_parses_its_arguments(script):
    out = subprocess.run([sys.executable, str(BENCHES / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_bench_solvers_writes_its_rows_and_instances(tmp_path):
    target, folder = tmp_path / "solvers.json", tmp_path / "instances"
    out = subprocess.run(
        [sys.executable, str(BENCHES / "bench_solvers.py"), "--json", str(target), "--repeats", "1", "--time-limit", "20",
         "--only", "convex-smollm2-135m.params,measured-smollm2-135m.kv", "--write-instances", str(folder)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(target.read_text())
    assert {r["instance"] for r in rows} == {"convex-smollm2-135m.params", "measured-smollm2-135m.kv"}
    assert {r["solver"] for r in rows} >= {"uniform", "seed", "greedy", "lagrange", "dp", "dp-lagrangian"}
    for row in rows:
        assert set(row) >= {"solver", "instance", "seconds", "objective", "gap", "proven_optimal", "status", "dp_speedup"}
        if row["solver"] == "dp":
            assert row["proven_optimal"] and abs(row["gap"]) < 1e-9  # dp is exact: nothing beats it
        if row["solver"] in ("highs", "cpsat") and row["proven_optimal"]:
            assert abs(row["gap"]) < 1e-6 and row["dp_speedup"] > 0
    # every instance is a spec `layerprune allocate --spec` reads, with its best known objective
    for path in folder.glob("*.json"):
        meta = json.loads(path.read_text())["meta"]
        done = subprocess.run([sys.executable, "-m", "layerprune", "allocate", "--spec", str(path), "--json", "-"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["objective"] == pytest.approx(meta["best_known_objective"], rel=1e-9)
        assert "dp" in meta["proven_optimal_by"]


def test_bench_scoring_writes_its_rows(tmp_path):
    target = tmp_path / "scoring.json"
    out = subprocess.run(
        [sys.executable, str(BENCHES / "bench_scoring.py"), "--device", "cpu", "--shapes", "256x384", "--reps", "2",
         "--json", str(target), "--plot", str(tmp_path / "scoring.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(target.read_text())
    rows = data["rows"]
    assert {(r["op"], r["backend"]) for r in rows} >= {
        (op, backend) for op in ("head_rows", "channel_rows", "columns") for backend in ("torch-eager", "rust")
    } | {("channel_rows", "torch-pruning"), ("columns", "torch-pruning")}
    for row in rows:
        assert set(row) >= {"op", "backend", "shape", "dtype", "median_ms", "gbps", "speedup_vs_eager", "copy_fraction"}
        assert row["shape"] == "256x384" and row["dtype"] in ("float32", "bfloat16")
        assert row["median_ms"] > 0 and row["gbps"] > 0
        if row["backend"] == "torch-eager":
            assert row["speedup_vs_eager"] == 1.0
    assert "WARNING" not in out.stderr  # ours agrees with eager on every row
    assert is_png(tmp_path / "scoring.png")
    again = subprocess.run(
        [sys.executable, str(BENCHES / "bench_scoring.py"), "--from-json", str(target), "--plot", str(tmp_path / "again.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("\n") == len(rows) and is_png(tmp_path / "again.png")
    bad = subprocess.run(
        [sys.executable, str(BENCHES / "bench_scoring.py"), "--from-json", str(tmp_path / "missing.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot read rows" in bad.stderr


def test_bench_scoring_rejects_a_bad_shape():
    out = subprocess.run(
        [sys.executable, str(BENCHES / "bench_scoring.py"), "--shapes", "100x4096"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "multiple of the head size" in out.stderr


def test_tune_triton_sweeps_every_candidate(tmp_path):
    """The GPU tuner in the interpreter (timings meaningless): every candidate is correct and ranked."""
    from layerprune.kernels.weight_scores import TUNING_CANDIDATES

    target = tmp_path / "tune.json"
    out = subprocess.run(
        [sys.executable, str(BENCHES / "tune_triton.py"), "--device", "cpu", "--shapes", "128x64", "--dtypes", "bfloat16",
         "--reps", "1", "--json", str(target)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "WRONG" not in out.stderr
    rows = json.loads(target.read_text())["rows"]
    for op, axis in (("head_rows", 0), ("columns", 1)):
        mine = [r for r in rows if r["op"] == op]
        assert len(mine) == 4 * len(TUNING_CANDIDATES[axis])  # × programs per SM in {1, 2, 4, 8}
        assert sorted(r["rank"] for r in mine) == list(range(1, len(mine) + 1))
        assert sum(r["is_default"] for r in mine) == 1


def test_bench_scoring_memory_hooks_lower_the_gradient_peak(tmp_path):
    """Exact tensor peaks (profiler replay on CPU): with few tokens the gradients set the peak,
    and the hook scorer, which drops each gradient once scored, must hold far less."""
    from conftest import make_tiny_llama

    model_dir = tmp_path / "tiny"
    make_tiny_llama(hidden=64, intermediate=256, layers=4, vocab=64).save_pretrained(model_dir)
    target = tmp_path / "memory.json"
    out = subprocess.run(
        [sys.executable, str(BENCHES / "bench_scoring_memory.py"), "--model", str(model_dir), "--tokens", "8",
         "--device", "cpu", "--json", str(target)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    plain, hooks = json.loads(target.read_text())
    assert (plain["mode"], hooks["mode"]) == ("plain", "hooks")
    assert plain["checksum"] == pytest.approx(hooks["checksum"], rel=1e-6)
    grads = plain["all_scored_grads_mib"]
    assert plain["peak_tensors_over_loaded_mib"] >= grads  # every gradient alive at once
    assert hooks["peak_tensors_over_loaded_mib"] < 0.5 * grads


def test_plot_quality_draws_the_results_file(tmp_path):
    out = subprocess.run([sys.executable, str(BENCHES / "plot_quality.py"),
                          str(BENCHES / "results" / "quality_2026-12-01.json"), str(tmp_path / "q.png")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert is_png(tmp_path / "q.png")


def test_bench_heal_draws_its_results_file(tmp_path):
    sys.path.insert(0, str(BENCHES))
    import bench_heal

    results = json.loads((BENCHES / "results" / "heal-2026-12-07-a.json").read_text())
    bench_heal.plot(results, tmp_path / "heal.png")
    assert is_png(tmp_path / "heal.png")
