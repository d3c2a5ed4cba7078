"""Sweep the Triton scoring kernel's launch configurations (tile, warps, grid) on a GPU.

For each shape, dtype and op (head scores over rows, channel scores over columns), every
`TUNING_CANDIDATES[axis]` tile × programs-per-SM in {1, 2, 4, 8} is checked against eager, then
timed round-robin with eager and the same-bytes copy. Prints the best five and the default
(`DEFAULT_CONFIGS`) per op, and writes every row with --json: the data for choosing the
defaults. Without CUDA it runs in the Triton interpreter (a smoke test: timings meaningless).

    python benches/tune_triton.py [--device cuda|cpu] [--shapes 4096x4096 ...] [--dtypes ...] [--reps N] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "python"), str(HERE)]

from layerprune.atomic import write_json_atomic  # noqa: E402
from scoring_common import DTYPES, HEAD_DIM, SHAPES, copy_of, eager, gbps, make_pair, parse_shape, round_robin_ms, speed_fields  # noqa: E402

TUNED_OPS = {"head_rows": (0, HEAD_DIM), "columns": (1, 1)}
PROGRAMS_PER_SM = (1, 2, 4, 8)


def tune(device: str, shapes, dtypes, reps: int) -> list[dict]:
    from layerprune.kernels.weight_scores import DEFAULT_CONFIGS, TUNING_CANDIDATES, LaunchConfig, weight_scores_triton

    rows_out = []
    for shape in shapes:
        for dname in dtypes:
            w, g = make_pair(shape, DTYPES[dname], device)
            nbytes = 2 * w.numel() * w.element_size()
            for op, (axis, gs) in TUNED_OPS.items():
                ref = eager(w, g, axis, gs).float()
                fns = {"copy": copy_of(nbytes, device), "torch-eager": functools.partial(eager, w, g, axis, gs)}
                default = DEFAULT_CONFIGS[axis]
                for tile in TUNING_CANDIDATES[axis]:
                    for pps in PROGRAMS_PER_SM:
                        cfg = LaunchConfig(tile.block_r, tile.block_c, tile.num_warps, pps)
                        run = functools.partial(weight_scores_triton, w, g, None, kind="taylor", axis=axis, group_size=gs, config=cfg)
                        rel = float(((run() - ref).abs() / ref.abs().clamp_min(1e-30)).max())
                        if rel > 1e-3:
                            print(f"[tune] WRONG {cfg} on {op} {shape} {dname}: rel err {rel:.2e}; left out", file=sys.stderr)
                            continue
                        fns[cfg] = run
                med = round_robin_ms(fns, device, reps)
                copy_ms = med.pop("copy")
                eager_ms = med.pop("torch-eager")
                ranked = sorted(med.items(), key=lambda kv: kv[1])
                for rank, (cfg, ms) in enumerate(ranked, 1):
                    rows_out.append(
                        {
                            "op": op,
                            "shape": f"{shape[0]}x{shape[1]}",
                            "dtype": dname,
                            "block_r": cfg.block_r,
                            "block_c": cfg.block_c,
                            "num_warps": cfg.num_warps,
                            "programs_per_sm": cfg.programs_per_sm,
                            "is_default": cfg == default,
                            "rank": rank,
                            **speed_fields(nbytes, ms, eager_ms, copy_ms),
                        }
                    )
                mine = rows_out[-len(ranked):]
                copy_gbps = 2 * gbps(nbytes, copy_ms)
                print(f"== {op} {shape[0]}x{shape[1]} {dname}: copy {copy_gbps:.1f} GB/s, eager {eager_ms:.4f} ms", flush=True)
                shown = mine[:5] + [r for r in mine[5:] if r["is_default"]]
                for r in shown:
                    print(
                        f"  #{r['rank']:<3d} {r['block_r']:>4d}x{r['block_c']:<5d} warps {r['num_warps']} "
                        f"{r['programs_per_sm']} prog/SM  {r['median_ms']:9.4f} ms {r['gbps']:8.1f} GB/s "
                        f"{100 * r['copy_fraction']:5.1f}% of copy  x{r['speedup_vs_eager']:.2f} eager"
                        + ("  (default)" if r["is_default"] else ""),
                        flush=True,
                    )
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", help="weight shapes ROWSxCOLS (default: Llama-3-8B's)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path, help="write every row as JSON here")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    from layerprune.kernels import HAS_TRITON

    if not HAS_TRITON:
        print("tune_triton: triton is not installed", file=sys.stderr)
        return 2
    info = {"device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    print(f"[tune] {info}", flush=True)
    rows = tune(device, args.shapes or SHAPES, args.dtypes, args.reps)
    if args.json:
        write_json_atomic(args.json, {"info": info, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
