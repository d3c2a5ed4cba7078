"""The soak's rounds, run as a script in a process of its own (the rest of a test session would change its heap):
``python soak_rounds.py DATA_DIR WORK_DIR ROUNDS WARM_UP`` prints one JSON line: the open descriptors after the
warm-up and at the end, and the resident memory then, after each later round and at the end (MiB)."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return sorted(found)


def main(data_dir: str, work: str, rounds: int, warm_up: int) -> dict:
    import math

    sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
    from families import CASES, make_model, make_tokenizer

    from layerprune import PruneConfig, prune
    from layerprune.data import eval_tokens
    from layerprune.evaluation import perplexity
    from layerprune.export import save_pruned
    from layerprune.models import load_model

    source = Path(work) / "tiny"
    make_model(CASES[0]).save_pretrained(source)
    make_tokenizer().save_pretrained(source)
    config = PruneConfig(ratio=0.25, calib_samples=4, calib_seq_len=32, data_dir=data_dir)
    record: dict = {}
    for round_ in range(rounds):
        model, tokenizer = load_model(source)
        result = prune(model, tokenizer, config, progress=False)
        out = save_pruned(result.model, tokenizer, Path(work) / "out", overwrite=True)
        del model, result
        reloaded, tokenizer = load_model(out)
        ppl = perplexity(reloaded, eval_tokens(tokenizer, "wikitext2", data_dir, "test", max_tokens=512),
                         progress=False)["ppl"]
        if not math.isfinite(ppl):
            raise SystemExit(f"round {round_}: perplexity {ppl}")
        del reloaded, tokenizer
        gc.collect()
        if round_ == warm_up - 1:
            record.update(fds_start=open_fds(), rss_start=rss_mib(), rss_rounds=[])
        elif round_ >= warm_up:
            record["rss_rounds"].append(rss_mib())
    record.update(fds_end=open_fds(), rss_end=rss_mib())
    return record


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
