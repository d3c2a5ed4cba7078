"""The layer-by-layer executor's memory, measured: every method it runs prunes a random bf16 checkpoint (the
`mini` shape of benches/bench_sequential.py: 12 layers, hidden 1024, MLP 2816, a tied 32k vocabulary; 0.34 GB) in
a child process, whose peak RSS above its imports is held to the bound.

The bound: a quarter of the checkpoint, plus, for a method that solves with a projection's whole input Gram (the
lstsq refit, structured OBS), three float64 matrices of the widest projection input (the Gram, its damped copy
and its Cholesky factor or inverse, ``3 · 8 · in²`` bytes): that working set is one layer's, whatever the depth,
and on a Llama-3.2-1B-shaped checkpoint it alone is 0.65 × a quarter of it (docs/large-models.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))

import bench_sequential as bench  # noqa: E402

pytestmark = pytest.mark.slow

SHAPE = "mini"
# the methods that solve with a projection's whole input Gram (FLAP's compensation keeps the removed columns' only)
WHOLE_GRAM = {"activation-lstsq", "default", "uniform-obs"}
CHECKPOINT_SHARE = 0.25


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("memory") / "checkpoint"
    return folder, bench.write_checkpoint(folder, bench.SHAPES[SHAPE][0], SHAPE)


def _gram_working_set() -> int:
    _, hidden, heads, _, head_dim, mlp, _, _ = bench.SHAPES[SHAPE]
    widest = max(heads * head_dim, mlp)
    return 3 * 8 * widest**2


@pytest.mark.parametrize("method", sorted(bench.METHODS))
def test_layer_by_layer_peak_memory_stays_within_the_bound(tmp_path, checkpoint, method):
    folder, checkpoint_bytes = checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, bench.__file__, "--child", str(folder), str(tmp_path / "out"), "--shape", SHAPE,
         "--method", method, "--calib-samples", "8", "--calib-seq-len", "64", "--refit-samples", "8",
         "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    added = result["peak_rss_bytes"] - result["rss_after_imports_bytes"]
    bound = CHECKPOINT_SHARE * checkpoint_bytes + (_gram_working_set() if method in WHOLE_GRAM else 0)
    print(f"{method}: the run adds {added / 2**20:.1f} MiB = {added / checkpoint_bytes:.3f} x the checkpoint "
          f"({checkpoint_bytes / 2**20:.0f} MiB); bound {bound / 2**20:.1f} MiB")
    assert result["actual_ratio"] == pytest.approx(0.25, abs=0.01)
    assert added <= bound, (f"{method}: the layer-by-layer run added {added / 2**20:.1f} MiB to its imports' RSS, "
                            f"over the bound of {bound / 2**20:.1f} MiB")
