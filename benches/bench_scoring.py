"""Benchmark the fused Taylor scoring kernels against torch eager and Torch-Pruning.

CPU: Rust vs torch eager `(W*G).abs().float()...sum` vs TP 1.6.1 GroupTaylorImportance on
Llama-3-8B projection shapes, float32 and bfloat16. CUDA (when present): Triton vs eager.
A plain tensor copy of as many bytes as W and G hold is timed in the same rounds: `copy GB/s`
counts bytes read + written; kernel `GB/s` counts bytes read (W and G); `copy_fraction` =
kernel GB/s / copy GB/s. Candidates are timed round-robin, medians reported. Never asserts on time.

    python benches/bench_scoring.py [--quick] [--json OUT] [--device cpu|cuda] [--reps N] [--shapes 4096x4096 ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from layerprune.scoring import available_backends, weight_scores  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
QUICK_SHAPES = [(4096, 4096), (1024, 4096)]
HEAD_DIM = 128
# op -> (axis, group_size or None for head_dim), eager formula
OPS = {
    "head_rows": (0, HEAD_DIM),
    "channel_rows": (0, 1),
    "columns": (1, 1),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def eager(w: torch.Tensor, g: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    e = (w * g).abs().float()
    if axis == 0:
        return e.view(w.shape[0] // group_size, -1).sum(1)
    return e.sum(0).view(-1, group_size).sum(1)


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


def run(device: str, shapes, dtypes, reps: int, with_tp: bool) -> list[dict]:
    """Times every candidate of one (shape, dtype) round-robin, `reps` rounds, so that load from
    elsewhere on the machine hits eager, ours and the copy alike; reports medians."""
    rows_out = []
    backend = "triton" if device == "cuda" else "rust"
    if backend not in available_backends():
        print(f"[bench] backend {backend} not available here ({available_backends()}); timing eager only", file=sys.stderr)
    for shape in shapes:
        for dtype in dtypes:
            gen = torch.Generator().manual_seed(0)
            w = (torch.randn(shape, generator=gen) * 0.05).to(device=device, dtype=dtype)
            g = (torch.randn(shape, generator=gen) * 0.01).to(device=device, dtype=dtype)
            nbytes = 2 * w.numel() * w.element_size()
            # the copy moves as many bytes as the kernels read (W and G), so both see the same caches
            src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
            dst = torch.empty_like(src)
            dname = str(dtype).replace("torch.", "")
            fns = {("copy", ""): lambda: dst.copy_(src)}
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
            times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
            for fn in fns.values():
                fn()  # warm-up (and Triton compile)
            for rep in range(reps):
                for key, fn in fns.items():
                    # Torch-Pruning is 10-100x slower: half the rounds (at least 3) are plenty
                    if key[1] == "torch-pruning" and rep >= max(3, reps // 2):
                        continue
                    times[key].append(time_ms(fn, device))
            med = {key: statistics.median(ts) for key, ts in times.items()}
            cgbps = 2 * nbytes / (med[("copy", "")] * 1e-3) / 1e9
            for (op, name), ms in med.items():
                if op == "copy":
                    continue
                eager_ms = med[(op, "torch-eager")]
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows_out.append(
                    {
                        "op": op,
                        "backend": name,
                        "device": device,
                        "shape": f"{shape[0]}x{shape[1]}",
                        "dtype": dname,
                        "median_ms": round(ms, 3),
                        "gbps": round(gbps, 2),
                        "speedup_vs_eager": round(eager_ms / ms, 2),
                        "copy_fraction": round(gbps / cgbps, 3),
                        "copy_gbps": round(cgbps, 2),
                        "reps": len(times[(op, name)]),
                    }
                )
                r = rows_out[-1]
                print(
                    f"{op:13s} {name:14s} {r['shape']:>11s} {dname:9s} {ms:9.2f} ms {gbps:7.2f} GB/s "
                    f"x{r['speedup_vs_eager']:<6.2f} {100 * r['copy_fraction']:5.1f}% of copy ({cgbps:.1f} GB/s)",
                    flush=True,
                )
            del src, dst, fns
    return rows_out


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {text!r}") from None
    if rows % HEAD_DIM:
        raise argparse.ArgumentTypeError(f"rows must be a multiple of the head size {HEAD_DIM}, got {rows}")
    return rows, cols


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer repetitions")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning's importance")
    ap.add_argument("--shapes", type=_shape, nargs="+", help="weight shapes ROWSxCOLS (default: Llama-3-8B's)")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    reps = args.reps or (5 if args.quick else 15)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    info = {"device": device, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print(f"[bench] {info}", flush=True)
    rows = run(device, shapes, (torch.float32, torch.bfloat16), reps, with_tp=not args.no_tp)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
