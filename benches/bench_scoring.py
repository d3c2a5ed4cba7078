"""Benchmark the fused Taylor scoring kernels against torch eager and Torch-Pruning.

CPU: Rust vs torch eager `(W*G).abs().float()...sum` vs TP 1.6.1 GroupTaylorImportance on
Llama-3-8B projection shapes, float32 and bfloat16. CUDA (when present): Triton vs eager.
A plain tensor copy of as many bytes as W and G hold is timed in the same rounds: `copy GB/s`
counts bytes read + written; kernel `GB/s` counts bytes read (W and G); `copy_fraction` =
kernel GB/s / copy GB/s. Candidates are timed round-robin, medians reported. Never asserts on time.

    python benches/bench_scoring.py [--quick] [--json OUT] [--device cpu|cuda] [--reps N] [--shapes 4096x4096 ...] [--plot PNG]
    python benches/bench_scoring.py --from-json OUT [--plot PNG]   # print / plot earlier rows
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "python"), str(HERE)]

from scoring_common import (  # noqa: E402
    OPS,
    SHAPES,
    copy_of,
    eager,
    make_pair,
    parse_shape,
    plot_rows,
    round_robin_ms,
    speed_fields,
)

from layerprune.atomic import write_json_atomic  # noqa: E402
from layerprune.scoring import available_backends, weight_scores  # noqa: E402

QUICK_SHAPES = [(4096, 4096), (1024, 4096)]


def tp_taylor(w: torch.Tensor, g: torch.Tensor, axis: int):
    """A callable running TP's GroupTaylorImportance on the group of one Linear (out or in)."""
    import warnings

    import torch_pruning as tp

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
    lin.weight.grad = g
    model = torch.nn.Sequential(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, w.shape[1], dtype=w.dtype, device=w.device))
    fn = tp.prune_linear_out_channels if axis == 0 else tp.prune_linear_in_channels
    n = w.shape[0] if axis == 0 else w.shape[1]
    group = dg.get_pruning_group(lin, fn, idxs=list(range(n)))
    imp = tp.importance.GroupTaylorImportance(normalizer=None)
    return lambda: imp(group)


def print_row(r: dict) -> None:
    print(
        f"{r['op']:13s} {r['backend']:14s} {r['shape']:>11s} {r['dtype']:9s} {r['median_ms']:9.3f} ms "
        f"{r['gbps']:8.2f} GB/s x{r['speedup_vs_eager']:<6.2f} {100 * r['copy_fraction']:5.1f}% of copy "
        f"({r['copy_gbps']:.1f} GB/s)",
        flush=True,
    )


def run(device: str, shapes, dtypes, reps: int, with_tp: bool) -> list[dict]:
    """Every candidate of one (shape, dtype) timed round-robin with the same-bytes copy."""
    rows_out = []
    backend = "triton" if device == "cuda" else "rust"
    if backend not in available_backends():
        print(f"[bench] backend {backend} not available here ({available_backends()}); timing eager only", file=sys.stderr)
    for shape in shapes:
        for dtype in dtypes:
            w, g = make_pair(shape, dtype, device)
            nbytes = 2 * w.numel() * w.element_size()
            dname = str(dtype).replace("torch.", "")
            fns = {("copy", ""): copy_of(nbytes, device)}
            for op, (axis, gs) in OPS.items():
                fns[(op, "torch-eager")] = functools.partial(eager, w, g, axis, gs)
                if backend in available_backends():
                    ref = eager(w, g, axis, gs)
                    got = weight_scores(w, g, kind="taylor", axis=axis, group_size=gs, backend=backend)
                    rel = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
                    if rel > 1e-3:
                        print(f"[bench] WARNING {backend} differs from eager by {rel:.2e} on {op} {shape} {dname}", file=sys.stderr)
                    fns[(op, backend)] = functools.partial(
                        weight_scores, w, g, kind="taylor", axis=axis, group_size=gs, backend=backend
                    )
                if with_tp and gs == 1:
                    fns[(op, "torch-pruning")] = tp_taylor(w, g, axis)
            # Torch-Pruning is 10-100x slower: half the rounds are plenty
            med = round_robin_ms(fns, device, reps, few={key for key in fns if key[1] == "torch-pruning"})
            for (op, name), ms in med.items():
                if op == "copy":
                    continue
                rows_out.append(
                    {
                        "op": op,
                        "backend": name,
                        "device": device,
                        "shape": f"{shape[0]}x{shape[1]}",
                        "dtype": dname,
                        **speed_fields(nbytes, ms, med[(op, "torch-eager")], med[("copy", "")]),
                    }
                )
                print_row(rows_out[-1])
            del fns
    return rows_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer repetitions")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning's importance")
    ap.add_argument("--plot", type=Path, help="write a PNG of speed-ups and copy fractions here")
    ap.add_argument("--from-json", type=Path, help="time nothing: print and plot the rows of an earlier --json")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", help="weight shapes ROWSxCOLS (default: Llama-3-8B's)")
    args = ap.parse_args(argv)
    if args.from_json:
        try:
            saved = json.loads(args.from_json.read_text())
            info, rows, reps = saved["info"], saved["rows"], saved.get("reps", "?")
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench_scoring: cannot read rows from {args.from_json}: {exc}", file=sys.stderr)
            return 2
        for r in rows:
            print_row(r)
    else:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        reps = args.reps or (5 if args.quick else 15)
        shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
        info = {
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            # libgomp's workers spin for milliseconds after each torch op unless this is "passive"
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        }
        if device == "cuda":
            info["gpu"] = torch.cuda.get_device_name()
        print(f"[bench] {info}", flush=True)
        rows = run(device, shapes, (torch.float32, torch.bfloat16), reps, with_tp=not args.no_tp)
        if args.json:
            write_json_atomic(args.json, {"info": info, "reps": reps, "rows": rows})
    if args.plot:
        where = info.get("gpu") or f"{info['cpus']} CPU cores"
        plot_rows(rows, args.plot, f"Taylor scores, median of {reps} round-robin runs ({where})", info["device"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
