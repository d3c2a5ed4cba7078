"""How much calibration text the default method wants, chosen on held-out validation text, then measured on test.

WikiText-2 valid is split by rows: the first 85% is the calibration text (``--calib-dataset`` file), the last 15%
the held-out screening text (never calibrated on). The default method (reconstruction curves + dp + structured OBS
with the refit) prunes SmolLM2 to ``--ratio`` with refit batches of several sizes; each is screened on the first
``--screen-tokens`` held-out tokens (windows of 128). The best screened size is then measured with the README's
protocol (first 32,768 test tokens) at 0.20 and 0.25. Test text never decides anything here.

    .venv/bin/python benches/calibration_study.py --data-dir ../shared/data/wikitext-2-raw --out runs/calibration_study.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from layerprune.atomic import write_json_atomic
from layerprune.data import calibration_batch, eval_tokens
from layerprune.data.wikitext import read_rows, tokenize_text
from layerprune.errors import DataError
from layerprune.evaluation import perplexity
from layerprune.models import load_model
from layerprune.pruning import PruneConfig, pipeline

SIZES = ((10, 64), (64, 128), (32, 256), (64, 256), (128, 256))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--screen-tokens", type=int, default=8192)
    p.add_argument("--test-tokens", type=int, default=32768)
    p.add_argument("--sizes", default=",".join(f"{n}x{t}" for n, t in SIZES))
    p.add_argument("--fisher-samples", default="all",
                   help="comma list of Fisher subsets to screen with every size ('all' or a number of windows)")
    p.add_argument("--curve-samples", default="all",
                   help="comma list of reconstruction-curve subsets to screen ('all' or a number of refit windows)")
    p.add_argument("--no-test", action="store_true", help="screen only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    rows = read_rows(Path(args.data_dir) / "valid.txt")
    cut = int(len(rows) * 0.85)
    folder = Path(tempfile.mkdtemp(prefix="calib-study-"))
    calib_file = folder / "valid-calibration.txt"
    calib_file.write_text("\n".join(rows[:cut]) + "\n")
    held_out = tokenize_text(tok, "\n".join(rows[cut:]))[: args.screen_tokens]
    test = None if args.no_test else eval_tokens(tok, "wikitext2", args.data_dir, "test", args.test_tokens)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    out: dict = {"ratio": args.ratio, "calibration_rows": cut, "held_out_rows": len(rows) - cut,
                 "held_out_tokens": int(held_out.numel()), "screen": [], "test": []}

    fisher_options = [None if f == "all" else int(f) for f in args.fisher_samples.split(",")]
    curve_options = [None if f == "all" else int(f) for f in args.curve_samples.split(",")]

    def prune(ratio: float, samples: int, seq_len: int, fisher: int | None, curves: int | None):
        config = PruneConfig(ratio=ratio, layer_importance="reconstruction", importance="obs", refit="lstsq",
                             refit_samples=samples, refit_seq_len=seq_len, calib_dataset=str(calib_file),
                             fisher_samples=fisher, curve_samples=curves)
        calib = calibration_batch(tok, config.calib_samples, config.calib_seq_len, 0, str(calib_file))
        refit = calibration_batch(tok, samples, seq_len, 1, str(calib_file))
        t0 = time.perf_counter()
        result = pipeline.prune(model, tok, config, calib_ids=calib, refit_ids=refit, progress=False)
        return result, time.perf_counter() - t0

    for samples, seq_len in sizes:
        for fisher, curves in [(f, c) for c in curve_options for f in fisher_options]:
            try:
                result, seconds = prune(args.ratio, samples, seq_len, fisher, curves)
            except DataError as err:  # e.g. fewer rows of seq_len tokens than windows (one window per row)
                row = {"samples": samples, "seq_len": seq_len, "tokens": samples * seq_len, "not_drawn": str(err)}
                out["screen"].append(row)
                print(json.dumps(row), flush=True)
                write_json_atomic(args.out, out)
                continue
            ppl = perplexity(result.model, held_out, seq_len=128, progress=False)["ppl"]
            row = {"samples": samples, "seq_len": seq_len, "tokens": samples * seq_len, "fisher_samples": fisher,
                   "curve_samples": curves, "held_out_ppl": ppl, "prune_seconds": round(seconds, 1), "timings": result.report["timings"]}
            out["screen"].append(row)
            print(json.dumps(row), flush=True)
            write_json_atomic(args.out, out)
    best = min((r for r in out["screen"] if "held_out_ppl" in r), key=lambda r: r["held_out_ppl"])
    out["chosen"] = {"samples": best["samples"], "seq_len": best["seq_len"], "fisher_samples": best["fisher_samples"],
                     "curve_samples": best["curve_samples"]}
    write_json_atomic(args.out, out)
    if test is not None:
        for ratio in (0.20, 0.25):
            result, seconds = prune(ratio, best["samples"], best["seq_len"], best["fisher_samples"],
                                    best["curve_samples"])
            ppl = perplexity(result.model, test, seq_len=128, progress=False)["ppl"]
            row = {"ratio": ratio, "samples": best["samples"], "seq_len": best["seq_len"],
                   "fisher_samples": best["fisher_samples"], "curve_samples": best["curve_samples"], "test_ppl": ppl,
                   "params": result.allocation.params_after, "prune_seconds": round(seconds, 1)}
            out["test"].append(row)
            print(json.dumps(row), flush=True)
            write_json_atomic(args.out, out)
    os.remove(calib_file)
    folder.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
