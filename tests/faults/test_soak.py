"""Soak: prune -> save -> load -> eval, 50 times in one process on a tiny model. Open file descriptors stay exactly
flat; resident memory growth is bounded.

Measured 2026-12-07: RSS grows ~5 MiB a round with no growth in Python objects (gc.get_objects() is constant):
~1.3 MiB in the least-squares refit, ~4 MiB when a freshly loaded tokenizer tokenizes the test split (one tokenizer
reused levels off). The bound below holds that, not flat; flat is the goal (docs/reliability.md)."""

from __future__ import annotations

import gc
import os

import pytest
from faults.harness import make_checkpoint

ROUNDS = 50
WARM_UP = 5  # rounds before the baseline (first-use caches: tokenizers, kernels, allocator pools)
MAX_RSS_GROWTH_MIB = 360  # over the 45 measured rounds: 8 MiB a round (measured: ~5)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _open_fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return sorted(found)


@pytest.mark.slow
def test_prune_save_load_eval_fifty_times_keeps_fds_and_memory_flat(tmp_path, wikitext_dir):
    import torch

    from layerprune import PruneConfig, prune
    from layerprune.data import eval_tokens
    from layerprune.evaluation import perplexity
    from layerprune.export import save_pruned
    from layerprune.models import load_model

    source = make_checkpoint(tmp_path / "tiny")
    config = PruneConfig(ratio=0.25, calib_samples=4, calib_seq_len=32, data_dir=str(wikitext_dir))
    fds = rss = None
    for round_ in range(ROUNDS):
        model, tokenizer = load_model(source)
        result = prune(model, tokenizer, config, progress=False)
        out = save_pruned(result.model, tokenizer, tmp_path / "out", overwrite=True)
        del model, result
        reloaded, tokenizer = load_model(out)
        ppl = perplexity(reloaded, eval_tokens(tokenizer, "wikitext2", str(wikitext_dir), "test", max_tokens=512),
                         progress=False)["ppl"]
        assert torch.isfinite(torch.tensor(ppl))
        del reloaded, tokenizer
        gc.collect()
        if round_ == WARM_UP - 1:
            fds, rss = _open_fds(), _rss_mib()
    assert _open_fds() == fds
    growth = _rss_mib() - rss
    assert growth < MAX_RSS_GROWTH_MIB, f"resident memory grew {growth:.1f} MiB over {ROUNDS - WARM_UP} rounds"
