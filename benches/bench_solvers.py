"""Allocation solver speed and quality on Llama-shaped instances with random convex curves.

Instances: Llama-3-70B shape (80 layers, 64/8 heads, head_dim 128, hidden 8192, MLP 28672 in
steps of 64), Llama-3-8B (32 layers, 32/8, 128, 4096, MLP 14336 in steps of 64) and SmolLM2-135M
(30 layers, 9/3, 64, 576, MLP 1536 in steps of 1), all at ratio 0.25. ``numpy-dp`` is the same
knapsack DP (same units, window and option sets) vectorised with NumPy, merging every option by
brute force. Prints a table of medians; ``--json OUT`` writes rows
``solver, instance, median_ms, objective, gap_to_dp, actual_ratio``. Never fails on time.

    python benches/bench_solvers.py [--json OUT] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from layerprune.allocation import SOLVERS, AllocationSpec, LayerShape, allocate
from layerprune.atomic import write_json_atomic

INSTANCES = {
    # name: (layers, hidden, q heads, kv heads, head_dim, intermediate, mlp_step, vocab, tied)
    "llama3-70b": (80, 8192, 64, 8, 128, 28672, 64, 128256, False),
    "llama3-8b": (32, 4096, 32, 8, 128, 14336, 64, 128256, False),
    "smollm2-135m": (30, 576, 9, 3, 64, 1536, 1, 49152, True),
}


def convex_curve(rng: np.random.Generator, n: int) -> np.ndarray:
    """Loss over kept units 0..n, 0 at n, with increments growing as fewer units are kept."""
    inc = np.sort(rng.random(n))[::-1] * rng.uniform(0.1, 1.0)  # inc[k]: loss of going from k+1 to k kept
    curve = np.zeros(n + 1)
    curve[:-1] = np.cumsum(inc[::-1])[::-1]
    return curve


def make_instance(name: str, ratio: float = 0.25, seed: int = 0) -> AllocationSpec:
    n, d, hq, hkv, hd, inter, step, vocab, tied = INSTANCES[name]
    rng = np.random.default_rng(seed)
    nf = math.ceil(inter / step)
    return AllocationSpec(
        ratio=ratio,
        layers=[LayerShape(d, hq, hkv, hd, inter, norm_params=2 * d)] * n,
        extra_params=vocab * d * (1 if tied else 2) + d,
        attn_curves=[convex_curve(rng, hkv) for _ in range(n)],
        mlp_curves=[convex_curve(rng, nf) for _ in range(n)],
        mlp_step=step,
    )


def numpy_dp(spec: AllocationSpec) -> float:
    """The same multiple-choice knapsack as the Rust `dp` (default constraints only): units are
    the GCD of all removal amounts, states capped at the window's top, every option merged by a
    shifted vectorised minimum. Returns the optimal objective."""
    items = []  # (removed params per option, loss per option), least removal first
    for l, s in enumerate(spec.layers):
        r = s.num_q_heads // s.num_kv_heads
        gc = s.hidden * s.head_dim * (2 * r + 2)
        cc = 3 * s.hidden
        gs = np.arange(s.num_kv_heads, spec.min_kv_groups - 1, -1)
        items.append(((s.num_kv_heads - gs) * gc, np.asarray(spec.attn_curves[l])[gs]))
        fs = np.array([f for f in range(0, s.intermediate, spec.mlp_step)] + [s.intermediate])[::-1]
        fs = fs[fs >= spec.mlp_step]
        idx = np.array([math.ceil(s.intermediate / spec.mlp_step) if f == s.intermediate else f // spec.mlp_step for f in fs])
        items.append(((s.intermediate - fs) * cc, np.asarray(spec.mlp_curves[l])[idx]))
    unit = 0
    for removed, _ in items:
        unit = math.gcd(unit, *[int(x) for x in removed])
    s0 = spec.layers[0]
    granule = min(s0.hidden * s0.head_dim * (2 * (s0.num_q_heads // s0.num_kv_heads) + 2), 3 * s0.hidden * spec.mlp_step)
    target = round(spec.ratio * spec.params_total)
    lo, hi = -(-target // unit), (target + granule) // unit
    cur = np.full(hi + 1, np.inf)
    cur[0] = 0.0
    for removed, loss in items:
        new = np.full(hi + 1, np.inf)
        for u, x in zip(removed // unit, loss - loss[0]):
            u = int(u)
            if u > hi:
                break
            np.minimum(new[u:], cur[: hi + 1 - u] + x, out=new[u:])
        cur = new
    base = sum(float(loss[0]) for _, loss in items)
    return base + float(cur[lo:].min())


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write result rows as JSON to this path")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--numpy-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    for name in INSTANCES:
        spec = make_instance(name)
        dp_ms, dp_res = timed(lambda: allocate(spec, "dp"), args.repeats)
        dp_obj = dp_res.objective
        for solver in SOLVERS:
            ms, res = (dp_ms, dp_res) if solver == "dp" else timed(lambda: allocate(spec, solver), args.repeats)
            rows.append(
                {"solver": solver, "instance": name, "median_ms": ms, "objective": res.objective,
                 "gap_to_dp": res.objective - dp_obj, "actual_ratio": res.actual_ratio}
            )  # fmt: skip
        np_ms, np_obj = timed(lambda: numpy_dp(spec), args.numpy_repeats)
        rows.append(
            {"solver": "numpy-dp", "instance": name, "median_ms": np_ms, "objective": np_obj,
             "gap_to_dp": np_obj - dp_obj, "actual_ratio": float("nan")}
        )  # fmt: skip
    print(f"{'instance':<14} {'solver':<9} {'median_ms':>11} {'objective':>14} {'gap_to_dp':>11} {'actual_ratio':>12}")
    for r in rows:
        print(
            f"{r['instance']:<14} {r['solver']:<9} {r['median_ms']:>11.3f} {r['objective']:>14.6f} "
            f"{r['gap_to_dp']:>11.2e} {r['actual_ratio']:>12.6f}"
        )
    for name in INSTANCES:
        dp = next(r for r in rows if r["instance"] == name and r["solver"] == "dp")
        npd = next(r for r in rows if r["instance"] == name and r["solver"] == "numpy-dp")
        print(f"{name}: numpy-dp / dp = {npd['median_ms'] / dp['median_ms']:.0f}x")
    if args.json:
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
        write_json_atomic(Path(args.json), clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
