"""Benchmarks stay runnable: they are off the default path, so a refactor could break them silently.
These tests run them (or their argument parsing) and check the JSON schema; they assert nothing on time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

BENCHES = REPO_ROOT / "benches"


@pytest.mark.parametrize("script", ["bench_scoring.py", "bench_scoring_memory.py", "bench_solvers.py"])
def test_bench_parses_its_arguments(script):
    out = subprocess.run([sys.executable, str(BENCHES / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_bench_solvers_writes_its_rows(tmp_path):
    target = tmp_path / "solvers.json"
    out = subprocess.run(
        [sys.executable, str(BENCHES / "bench_solvers.py"), "--json", str(target), "--repeats", "1", "--numpy-repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(target.read_text())
    assert {r["solver"] for r in rows} >= {"uniform", "seed", "greedy", "lagrange", "dp", "numpy-dp"}
    for row in rows:
        assert set(row) >= {"solver", "instance", "median_ms", "objective", "gap_to_dp", "actual_ratio"}
        if row["solver"] in ("dp", "numpy-dp"):
            assert abs(row["gap_to_dp"]) < 1e-6  # the NumPy DP is the same algorithm: same optimum
