"""Would letting the allocation empty a block (zero KV groups: no attention; zero channels: no MLP) help?

The default method (reconstruction curves + dp + structured OBS with the least-squares refit) prunes SmolLM2 to
``--ratio`` twice from the same curves and refit batch: with the floors of today (one KV group and one channel per
layer) and with no floor, where a layer's attention or MLP may go whole. The refit model is measured as it is, with
the removed columns of o_proj / down_proj zero (the function of the pruned model: an empty attention adds nothing
to the residual stream), on held-out validation rows (the last 15%, never calibrated on; the calibration text is
the first 85%), then on the first ``--test-tokens`` test tokens. Nothing is chosen on test.

    .venv/bin/python benches/empty_blocks_study.py --data-dir ../shared/data/wikitext-2-raw --out runs/empty.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from layerprune.allocation import allocate
from layerprune.atomic import write_json_atomic
from layerprune.data import calibration_batch, eval_tokens
from layerprune.data.wikitext import read_rows, tokenize_text
from layerprune.evaluation import perplexity
from layerprune.importance import reconstruction_importance
from layerprune.models import load_model
from layerprune.pruning import PruneConfig
from layerprune.pruning.config import resolve_config
from layerprune.pruning.pipeline import spec_for_model
from layerprune.pruning.refit_loop import refit_kept_weights
from layerprune.scoring.selection import LayerKeep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--screen-tokens", type=int, default=8192)
    p.add_argument("--test-tokens", type=int, default=8192)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    rows = read_rows(Path(args.data_dir) / "valid.txt")
    cut = int(len(rows) * 0.85)
    folder = Path(tempfile.mkdtemp(prefix="empty-study-"))
    calib_file = folder / "valid-calibration.txt"
    calib_file.write_text("\n".join(rows[:cut]) + "\n")
    held_out = tokenize_text(tok, "\n".join(rows[cut:]))[: args.screen_tokens]
    test = eval_tokens(tok, "wikitext2", args.data_dir, "test", args.test_tokens)
    config = resolve_config(PruneConfig(ratio=args.ratio, calib_dataset=str(calib_file)))
    refit = calibration_batch(tok, config.refit_samples, config.refit_seq_len, config.seed + 1, str(calib_file))
    t0 = time.perf_counter()
    # the curves to zero KV groups (exact greedy OBS: the first Hkv - 1 steps are those of the floored curves)
    curves = reconstruction_importance(model, refit, mlp_step=config.mlp_step, min_kv_groups=0,
                                       damping=config.refit_damping, fisher_samples=config.fisher_samples,
                                       progress=False)
    out: dict = {"ratio": args.ratio, "refit_tokens": int(refit.numel()), "held_out_tokens": int(held_out.numel()),
                 "test_tokens": int(test.numel()), "curves_seconds": round(time.perf_counter() - t0, 1), "runs": []}
    for empty in (False, True):
        spec = spec_for_model(model, config, curves)
        if empty:
            spec.min_kv_groups, spec.min_mlp = 0, 0
        else:
            spec.attn_curves = [c.copy() for c in spec.attn_curves]
            for c in spec.attn_curves:
                c[0] = c[1]  # never planned, as the default curves say
        alloc = allocate(spec, "dp")
        work = copy.deepcopy(model)
        keep = [LayerKeep(tuple(range(a.kv_groups_kept)), tuple(range(a.mlp_kept))) for a in alloc.layers]
        refit_kept_weights(work, keep, refit, damping=config.refit_damping, progress=False, select="obs")
        row = {"empty_blocks_allowed": empty, "objective": alloc.objective, "actual_ratio": alloc.actual_ratio,
               "empty_attention": sum(a.kv_groups_kept == 0 for a in alloc.layers),
               "empty_mlp": sum(a.mlp_kept == 0 for a in alloc.layers),
               "kv_groups": [a.kv_groups_kept for a in alloc.layers], "mlp": [a.mlp_kept for a in alloc.layers],
               "held_out_ppl": perplexity(work, held_out, seq_len=128, progress=False)["ppl"],
               "test_ppl": perplexity(work, test, seq_len=128, progress=False)["ppl"]}
        out["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("kv_groups", "mlp")}), flush=True)
        write_json_atomic(args.out, out)
        del work
    os.remove(calib_file)
    folder.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
