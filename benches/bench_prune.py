"""Wall time of `layerprune prune` with the default (best measured) method on SmolLM2-135M, stage by stage.

Runs :func:`layerprune.pruning.prune` ``--repeats`` times with the defaults of ``layerprune prune`` (structured
OBS, reconstruction curves, dp, refit with error correction) at ``--ratio`` and prints the median of every stage
next to two references measured in the same run on the same refit batch: one plain forward pass of the dense
model (no gradients), and one forward + backward. The ratios say how many forward passes the prune costs.
Calibration comes from WikiText-2 valid; nothing is evaluated. Never asserts.

    .venv/bin/python benches/bench_prune.py --data-dir ../shared/data/wikitext-2-raw [--repeats 3] [--threads 2]
        [--refit-samples 32 --refit-seq-len 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layerprune.atomic import write_json_atomic
from layerprune.models import load_model
from layerprune.pruning import PruneConfig, pipeline


def _forward_seconds(model: torch.nn.Module, ids: torch.Tensor, backward: bool, micro_batch: int = 8) -> float:
    t0 = time.perf_counter()
    for s in range(0, ids.shape[0], micro_batch):
        batch = ids[s:s + micro_batch]
        if backward:
            with torch.enable_grad():
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        else:
            with torch.no_grad():
                model(input_ids=batch, use_cache=False)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--refit-samples", type=int, default=PruneConfig.refit_samples)
    p.add_argument("--refit-seq-len", type=int, default=PruneConfig.refit_seq_len)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    config = PruneConfig(ratio=args.ratio, layer_importance="reconstruction", importance="obs", refit="lstsq",
                         refit_samples=args.refit_samples, refit_seq_len=args.refit_seq_len, data_dir=args.data_dir)
    calib, _ = pipeline.calibration_ids(tok, config)
    refit = pipeline.refit_batch(tok, config)
    runs: list[dict[str, float]] = []
    refs = {"forward": [], "forward_backward": []}
    for _ in range(args.repeats):
        refs["forward"].append(_forward_seconds(model, refit, backward=False))
        refs["forward_backward"].append(_forward_seconds(model, refit, backward=True))
        result = pipeline.prune(model, tok, config, calib_ids=calib, refit_ids=refit, progress=False)
        runs.append(result.report["timings"])
        del result
    stages = [k for k in runs[0] if k != "total"] + ["total"]
    median = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in stages}
    fwd = statistics.median(refs["forward"])
    fwd_bwd = statistics.median(refs["forward_backward"])
    tokens = int(refit.numel())
    print(f"SmolLM2-135M, ratio {args.ratio}, refit batch {args.refit_samples} x {args.refit_seq_len} = {tokens:,} "
          f"tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'stage':<20} {'seconds':>9} {'x forward':>10}")
    for k in stages:
        print(f"{k:<20} {median[k]:>9.1f} {median[k] / fwd:>10.2f}")
    print(f"{'ref: forward':<20} {fwd:>9.1f} {1.0:>10.2f}")
    print(f"{'ref: fwd + bwd':<20} {fwd_bwd:>9.1f} {fwd_bwd / fwd:>10.2f}")
    if args.json:
        write_json_atomic(args.json, {"ratio": args.ratio, "tokens": tokens, "threads": args.threads, "runs": runs,
                                      "median": median, "forward_seconds": refs["forward"],
                                      "forward_backward_seconds": refs["forward_backward"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
