"""Shared by bench_scoring.py and tune_triton.py: Llama-3-8B shapes, the eager formula, the
same-bytes copy, round-robin timing and the plot."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
HEAD_DIM = 128
# op -> (axis, group_size): head scores over output rows, channel scores over rows / columns
OPS = {
    "head_rows": (0, HEAD_DIM),
    "channel_rows": (0, 1),
    "columns": (1, 1),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# calls per timed sample: one on CPU; ten queued calls per synchronize on CUDA, so that the
# synchronize and Python's return path do not dominate kernels of a few tens of microseconds
BATCH = {"cpu": 1, "cuda": 10}


def eager(w: torch.Tensor, g: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    """The unfused baseline: `(W*G).abs().float()` then row or column sums, then group sums."""
    e = (w * g).abs().float()
    if axis == 0:
        return e.view(w.shape[0] // group_size, -1).sum(1)
    return e.sum(0).view(-1, group_size).sum(1)


def make_pair(shape: tuple[int, int], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=gen) * 0.05).to(device=device, dtype=dtype)
    g = (torch.randn(shape, generator=gen) * 0.01).to(device=device, dtype=dtype)
    return w, g


def copy_of(nbytes: int, device: str) -> Callable[[], object]:
    """A plain copy of `nbytes` (as many bytes as the kernels read), for the bandwidth ceiling."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def round_robin_ms(fns: dict, device: str, reps: int, few: set | None = None) -> dict:
    """Median ms per call of every callable, timed in turn `reps` rounds (keys in `few`: only the
    first max(3, reps // 2) rounds), so load from elsewhere on the machine hits all alike. Each
    round runs in its own shuffled order (seeded): whatever one call leaves behind (torch's
    OpenMP workers still spinning, dirty cache lines) falls on every candidate in turn."""
    batch = BATCH.get(device, 1)
    few = few or set()
    times: dict = {key: [] for key in fns}
    for fn in fns.values():
        fn()  # warm-up (and Triton compile)
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for rep in range(reps):
        shuffle(order)
        for key in order:
            fn = fns[key]
            if key in few and rep >= max(3, reps // 2):
                continue
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            _sync(device)
            times[key].append((time.perf_counter() - t0) * 1e3 / batch)
    return {key: statistics.median(ts) for key, ts in times.items()}


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def speed_fields(nbytes: int, ms: float, eager_ms: float, copy_ms: float) -> dict:
    """The row fields every benchmark reports for a call reading `nbytes` in `ms`: its median,
    read GB/s, speed-up over eager, and fraction of the same-bytes copy's (read + write) GB/s."""
    copy_gbps = 2 * gbps(nbytes, copy_ms)
    return {
        "median_ms": round(ms, 4),
        "gbps": round(gbps(nbytes, ms), 2),
        "speedup_vs_eager": round(eager_ms / ms, 2),
        "copy_fraction": round(gbps(nbytes, ms) / copy_gbps, 3),
        "copy_gbps": round(copy_gbps, 2),
    }


def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x4096, got {text!r}") from None
    if rows <= 0 or cols <= 0 or rows % HEAD_DIM:
        raise argparse.ArgumentTypeError(f"rows must be a positive multiple of the head size {HEAD_DIM}, got {rows}")
    return rows, cols


SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# the goals: (× eager, fraction of copy bandwidth) per device
GOALS = {"cpu": (5.0, 0.6), "cuda": (4.0, 0.8)}


def plot_rows(rows: list[dict], path: Path, title: str, device: str) -> Path:
    """Two panels: speed-up over eager and fraction of copy bandwidth, one bar per (shape, dtype,
    op) and backend other than eager; the goals for `device` as dashed lines."""
    from layerprune.report.plots import plt, save_figure

    backends = [b for b in dict.fromkeys(r["backend"] for r in rows) if b != "torch-eager"]
    cases = list(dict.fromkeys((r["shape"], r["dtype"], r["op"]) for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(cases) + 2), 7), sharex=True)
    width = 0.8 / max(1, len(backends))
    for i, backend in enumerate(backends):
        by_case = {(r["shape"], r["dtype"], r["op"]): r for r in rows if r["backend"] == backend}
        xs = [k + (i - (len(backends) - 1) / 2) * width for k, c in enumerate(cases) if c in by_case]
        present = [c for c in cases if c in by_case]
        axes[0].bar(xs, [by_case[c]["speedup_vs_eager"] for c in present], width, label=backend)
        axes[1].bar(xs, [100 * by_case[c]["copy_fraction"] for c in present], width, label=backend)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    if device in GOALS:
        speedup, fraction = GOALS[device]
        axes[0].axhline(speedup, color="red", lw=0.8, ls="--", label=f"goal {speedup:g}×")
        axes[1].axhline(100 * fraction, color="red", lw=0.8, ls="--", label=f"goal {100 * fraction:g}%")
    axes[0].set_ylabel("× torch eager (higher is faster)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("% of copy bandwidth")
    axes[1].axhline(100, color="gray", lw=0.8)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels([f"{s} {SHORT_DTYPE.get(d, d)} {o}" for s, d, o in cases], rotation=70, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[0].set_title(title)
    return save_figure(fig, path)
