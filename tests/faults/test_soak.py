"""Soak: prune -> save -> load -> eval, 50 times in one process on a tiny model (``soak_rounds.py``, in a process of
its own). Open file descriptors stay exactly flat; resident memory growth is bounded.

Measured 2026-12-07: RSS grows ~5 MiB a round with no growth in Python objects (gc.get_objects() is constant):
~1.3 MiB in the least-squares refit, ~4 MiB when a freshly loaded tokenizer tokenizes the test split (one tokenizer
reused levels off). The bound below holds that, not flat; flat is the goal (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROUNDS = 50
WARM_UP = 5  # rounds before the baseline (first-use caches: tokenizers, kernels, allocator pools)
MAX_RSS_GROWTH_MIB = 360  # over the 45 measured rounds: 8 MiB a round (measured: ~5)


@pytest.mark.slow
def test_prune_save_load_eval_fifty_times_keeps_fds_flat_and_memory_bounded(tmp_path, wikitext_dir):
    script = Path(__file__).with_name("soak_rounds.py")
    done = subprocess.run([sys.executable, str(script), str(wikitext_dir), str(tmp_path), str(ROUNDS), str(WARM_UP)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["fds_end"] == record["fds_start"]
    growth = record["rss_end"] - record["rss_start"]
    assert growth < MAX_RSS_GROWTH_MIB, f"resident memory grew {growth:.1f} MiB over {ROUNDS - WARM_UP} rounds"
