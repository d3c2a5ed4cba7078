"""Allocation solvers against reference optimisers (HiGHS, OR-Tools CP-SAT) on a fixed instance set.

Instance families (``FAMILIES``): random convex curves and random non-convex curves (monotone, increments in
random order) on the Llama-3-70B (80 layers, 64/8 heads, head_dim 128, hidden 8192, MLP 28672 in steps of
64), Llama-3-8B (32 layers, 32/8, 128, 4096, MLP 14336 in steps of 64) and SmolLM2-135M (30 layers, 9/3, 64,
576, MLP 1536 in steps of 8) shapes, and the sensitivity curves `prune` measured on SmolLM2-135M (MLP step 1,
``benches/instances/source/``, written by ``measure_smollm2_curves.py``). Budgets (``BUDGETS``): 25% of the
parameters alone, with at least 40% of the KV cache, with at least 30% of the FLOPs per token at 2048
positions, with both, and the KV-cache / FLOPs bounds without a parameter budget.

Every instance is solved by our solvers (``dp``; ``dp`` with ``dp_method=lagrangian``; ``greedy``, ``lagrange``,
``uniform`` and ``seed`` where they take the budget) and, when the ``bench`` extra is installed, by HiGHS (MILP)
and CP-SAT with ``--time-limit`` seconds each (one thread). Per solver and instance: time (the median of
``--repeats`` runs for ours), objective, gap to the best known objective, whether optimality was proven, and
for the references dp's speed ratio (reference time / dp time). ``--write-instances DIR`` writes every instance
as a spec JSON (``layerprune allocate --spec`` reads it) whose ``meta`` holds the budgets as integer bounds and
the best known objective; ``--instances DIR`` re-runs on such files. Never fails on time.

    python benches/bench_solvers.py [--json OUT] [--write-instances benches/instances] [--instances DIR]
        [--only PATTERNS] [--time-limit 60] [--repeats 5] [--no-references] [--from-json ROWS]
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from layerprune.allocation import AllocationSpec, LayerShape, allocate, load_spec, spec_from_json, spec_to_json
from layerprune.allocation.references import REFERENCE_SOLVERS, build_knapsack
from layerprune.atomic import json_safe, write_json_atomic, write_text_atomic
from layerprune.errors import InfeasibleError, InvalidInputError

HERE = Path(__file__).resolve().parent
MEASURED_SOURCE = HERE / "instances" / "source" / "smollm2-135m-sensitivity.json"

SHAPES = {
    # name: (layers, hidden, q heads, kv heads, head_dim, intermediate, mlp_step, vocab, tied)
    "llama3-70b": (80, 8192, 64, 8, 128, 28672, 64, 128256, False),
    "llama3-8b": (32, 4096, 32, 8, 128, 14336, 64, 128256, False),
    "smollm2-135m": (30, 576, 9, 3, 64, 1536, 8, 49152, True),
}
FAMILIES = ("convex-llama3-70b", "convex-llama3-8b", "convex-smollm2-135m", "nonconvex-llama3-70b",
            "nonconvex-llama3-8b", "nonconvex-smollm2-135m", "measured-smollm2-135m")
# name: (ratio, kv_cache_ratio, flops_ratio); "bind" = above what the parameter budget alone achieves:
# that solution's KV-cache ratio + 0.15 and FLOPs ratio + 0.05 (in steps of 0.01, lowered by 0.05 until feasible)
BUDGETS = {
    "params": (0.25, None, None),
    "params+kv": (0.25, "bind", None),
    "params+flops": (0.25, None, "bind"),
    "params+kv+flops": (0.25, "bind", "bind"),
    "kv": (None, 0.5, None),
    "flops": (None, None, 0.3),
}
BIND_MARGIN = {"kv": 0.15, "flops": 0.05}
FLOPS_SEQ_LEN = 2048
OURS = ("dp", "dp-lagrangian", "greedy", "lagrange", "uniform", "seed")
TOL = 1e-9


def convex_curve(rng: np.random.Generator, n: int) -> np.ndarray:
    """Loss over kept units 0..n, 0 at n, with increments growing as fewer units are kept."""
    inc = np.sort(rng.random(n))[::-1] * rng.uniform(0.1, 1.0)  # inc[k]: loss of going from k+1 to k kept
    curve = np.zeros(n + 1)
    curve[:-1] = np.cumsum(inc[::-1])[::-1]
    return curve


def nonconvex_curve(rng: np.random.Generator, n: int) -> np.ndarray:
    """Loss over kept units 0..n, 0 at n, decreasing in kept, increments in random order (not convex)."""
    inc = rng.random(n) ** 3 * rng.uniform(0.1, 1.0)
    curve = np.zeros(n + 1)
    curve[:-1] = np.cumsum(inc[::-1])[::-1]
    return curve


def family_spec(family: str, seed: int = 0) -> AllocationSpec:
    """The curves and shapes of a family, at the parameter budget 0.25 (budgets are set per instance)."""
    if family.startswith("measured-"):
        return load_spec(MEASURED_SOURCE)
    kind, shape = family.split("-", 1)
    n, d, hq, hkv, hd, inter, step, vocab, tied = SHAPES[shape]
    rng = np.random.default_rng(seed)
    make = convex_curve if kind == "convex" else nonconvex_curve
    nf = math.ceil(inter / step)
    # a KV group holds as many parameters as `per_group` MLP steps: scaled so, a unit of either costs about
    # the same loss per parameter and the allocation is a real trade-off between them
    per_group = (hd * (2 * (hq // hkv) + 2)) / (3 * step)
    return AllocationSpec(
        ratio=0.25,
        layers=[LayerShape(d, hq, hkv, hd, inter, norm_params=2 * d)] * n,
        extra_params=vocab * d * (1 if tied else 2) + d,
        extra_flops=2 * vocab * d,
        attn_curves=[make(rng, hkv) * per_group for _ in range(n)],
        mlp_curves=[make(rng, nf) for _ in range(n)],
        mlp_step=step,
    )


def ceil2(x: float) -> float:
    return math.ceil(round(x * 100, 9)) / 100


def with_budget(spec: AllocationSpec, budget: str) -> AllocationSpec:
    ratio, kv, flops = BUDGETS[budget]
    out = spec_from_json(spec_to_json(spec))
    out.ratio, out.kv_cache_ratio, out.flops_ratio, out.flops_seq_len = ratio, None, None, FLOPS_SEQ_LEN
    out.attn_importance = out.mlp_importance = out.importance = None  # the curves are the objective
    if "bind" not in (kv, flops):
        out.kv_cache_ratio, out.flops_ratio = kv, flops
        return out
    alone = allocate(out, "dp")
    for back in (0.0, 0.05, 0.1, 0.15, 0.2):  # lower the margin until the combination is feasible
        if kv is not None:
            out.kv_cache_ratio = min(0.95, ceil2(alone.actual_kv_cache_ratio + BIND_MARGIN["kv"] - back))
        if flops is not None:
            out.flops_ratio = ceil2(alone.actual_flops_ratio + BIND_MARGIN["flops"] - back)
        try:
            allocate(out, "dp")
            break
        except InfeasibleError:
            continue
    return out


def instance_bounds(spec: AllocationSpec) -> dict[str, Any]:
    """The budgets as integer bounds (what another solver has to meet), from the knapsack's own counts."""
    ks = build_knapsack(spec)
    return {"params_removed_window": ks.params_window, "params_removed_window_if_narrow_infeasible": ks.params_window_wide,
            "kv_cache_bytes_removed_at_least": ks.kv_cache_min, "flops_removed_at_least": ks.flops_min,
            "items": len(ks.items), "options": sum(len(it.options) for it in ks.items)}


def timed(fn, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_ours(spec: AllocationSpec, solver: str, repeats: int) -> dict[str, Any]:
    method = "lagrangian" if solver == "dp-lagrangian" else "auto"
    name = "dp" if solver == "dp-lagrangian" else solver
    s = spec_from_json({**spec_to_json(spec), "dp_method": method})
    try:
        seconds, res = timed(lambda: allocate(s, name), repeats)
    except (InfeasibleError, InvalidInputError) as exc:
        return {"solver": solver, "seconds": None, "objective": None, "proven_optimal": False,
                "status": "refused" if isinstance(exc, InvalidInputError) else "infeasible", "message": str(exc)}
    lower = None if math.isnan(res.lower_bound) else res.lower_bound
    in_budget = res.target_removed is None or res.target_removed <= res.params_removed <= res.target_removed + res.granule
    if not in_budget:  # the seed mapping misses the parameter target by design: its loss is not comparable
        return {"solver": solver, "seconds": seconds, "objective": None, "proven_optimal": False,
                "status": f"misses the budget (removes {res.actual_ratio:.4f})", "missed_objective": res.objective}
    return {"solver": solver, "seconds": seconds, "objective": res.objective, "proven_optimal": res.proven_optimal,
            "status": "optimal" if res.proven_optimal else "feasible", "lower_bound": lower,
            "actual_ratio": res.actual_ratio, "actual_kv_cache_ratio": res.actual_kv_cache_ratio,
            "actual_flops_ratio": res.actual_flops_ratio, "granule": res.granule}


def run_reference(spec: AllocationSpec, solver: str, time_limit: float, threads: int) -> dict[str, Any]:
    try:
        r = REFERENCE_SOLVERS[solver](spec, time_limit=time_limit, threads=threads)
    except InvalidInputError as exc:  # the extra is not installed
        return {"solver": solver, "seconds": None, "objective": None, "proven_optimal": False, "status": "missing",
                "message": str(exc)}
    return {"solver": solver, "seconds": r.seconds, "objective": r.objective, "proven_optimal": r.proven_optimal,
            "status": r.status, "lower_bound": r.bound, "window": r.window}


def solve_instance(name: str, spec: AllocationSpec, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = [run_ours(spec, s, args.repeats if s in ("dp", "greedy", "lagrange", "uniform", "seed") else 1) for s in OURS]
    if not args.no_references:
        rows += [run_reference(spec, s, args.time_limit, args.threads) for s in REFERENCE_SOLVERS]
    known = [r["objective"] for r in rows if r["objective"] is not None]
    best = min(known) if known else None
    dp = next(r for r in rows if r["solver"] == "dp")
    for r in rows:
        r["instance"] = name
        r["gap"] = None if r["objective"] is None or best is None else r["objective"] - best
        r["rel_gap"] = None if r["gap"] is None else r["gap"] / max(abs(best), 1e-300)
        r["dp_speedup"] = (r["seconds"] / dp["seconds"] if r["solver"] in REFERENCE_SOLVERS and r["seconds"]
                           and dp["seconds"] else None)
    return rows


def best_known(rows: list[dict[str, Any]]) -> dict[str, Any]:
    known = [r for r in rows if r["objective"] is not None]
    if not known:
        return {"best_known_objective": None, "best_known_by": [], "proven_optimal_by": []}
    best = min(r["objective"] for r in known)
    near = [r["solver"] for r in known if r["objective"] <= best + TOL * (1 + abs(best))]
    proven = [r["solver"] for r in known if r["proven_optimal"] and r["objective"] <= best + TOL * (1 + abs(best))]
    return {"best_known_objective": best, "best_known_by": near, "proven_optimal_by": proven}


def write_instance(folder: Path, name: str, family: str, budget: str, spec: AllocationSpec,
                   rows: list[dict[str, Any]]) -> None:
    data = spec_to_json(spec)
    data["meta"] = {
        "instance": name,
        "family": family,
        "budget": budget,
        **instance_bounds(spec),
        **best_known(rows),
        "solutions": {r["solver"]: r["objective"] for r in rows},
        "objective": "sum of attn_curve[g] + mlp_curve[j] over layers (kept KV groups g; j = kept channels / mlp_step)",
        "date": datetime.date.today().isoformat(),
        "written_by": "benches/bench_solvers.py --write-instances",
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"{name}.json", json.dumps(json_safe(data), allow_nan=False) + "\n")


def instances(args: argparse.Namespace) -> list[tuple[str, str, str, AllocationSpec]]:
    out = []
    if args.instances:
        for path in sorted(Path(args.instances).glob("*.json")):
            meta = json.loads(path.read_text()).get("meta", {})
            out.append((path.stem, meta.get("family", "?"), meta.get("budget", "?"), load_spec(path)))
    else:
        for family in FAMILIES:
            base = family_spec(family)
            budgets = list(BUDGETS) if family.startswith(("measured", "convex-llama3-8b")) else list(BUDGETS)[:4]
            for budget in budgets:
                out.append((f"{family}.{budget}", family, budget, with_budget(base, budget)))
    if args.only:
        out = [x for x in out if any(fnmatch.fnmatchcase(x[0], p) for p in args.only.split(","))]
    return out


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(rows: list[dict[str, Any]]) -> None:
    print(f"{'instance':<40} {'solver':<14} {'ms':>10} {'objective':>14} {'gap':>10} {'proven':>6} {'x dp':>8} status")
    for r in rows:
        ms = None if r["seconds"] is None else r["seconds"] * 1e3
        print(f"{r['instance']:<40} {r['solver']:<14} {fmt(ms, '10.2f')} {fmt(r['objective'], '14.6f')} "
              f"{fmt(r['gap'], '10.2e')} {('yes' if r['proven_optimal'] else 'no'):>6} {fmt(r['dp_speedup'], '8.0f')} "
              f"{r['status']}")


def family_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per family, medians over its instances: dp time, each reference's time, its proven count and dp's speed
    ratio, and the heuristics' relative gaps (median / max)."""
    by_instance: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_instance.setdefault(r["instance"], {})[r["solver"]] = r
    families: dict[str, list[dict[str, dict[str, Any]]]] = {}
    for name, v in by_instance.items():
        families.setdefault(name.split(".")[0], []).append(v)

    def med(values: list[float], spec: str) -> str:
        return format(statistics.median(values), spec) if values else "-"

    head = (f"{'family':<24} {'n':>2} {'dp ms':>8} {'dp-lagr ms':>10} {'HiGHS s':>8} {'proven':>6} {'x dp':>6} "
            f"{'CP-SAT s':>8} {'proven':>6} {'x dp':>6} {'greedy gap med / max':>22}")
    out = [head]
    for fam, insts in families.items():
        cells = [f"{fam:<24} {len(insts):>2}",
                 f"{med([v['dp']['seconds'] * 1e3 for v in insts if v['dp']['seconds']], '.1f'):>8}",
                 f"{med([v['dp-lagrangian']['seconds'] * 1e3 for v in insts if v.get('dp-lagrangian', {}).get('seconds')], '.0f'):>10}"]
        for ref in REFERENCE_SOLVERS:
            mine = [v[ref] for v in insts if ref in v and v[ref]["status"] != "missing"]
            cells.append(f"{med([r['seconds'] for r in mine if r['seconds']], '.2f'):>8} "
                         f"{sum(r['proven_optimal'] for r in mine):>3}/{len(mine):<2} "
                         f"{med([r['dp_speedup'] for r in mine if r['dp_speedup']], '.0f'):>6}")
        gaps = [v["greedy"]["rel_gap"] for v in insts if v.get("greedy", {}).get("rel_gap") is not None]
        cells.append(f"{med(gaps, '.1e'):>11} / {(format(max(gaps), '.1e') if gaps else '-'):>8}")
        out.append(" ".join(cells))
    return out


def summary(rows: list[dict[str, Any]]) -> list[str]:
    by_instance: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_instance.setdefault(r["instance"], {})[r["solver"]] = r
    lines = []
    refs = [s for s in REFERENCE_SOLVERS if any(s in v and v[s]["status"] != "missing" for v in by_instance.values())]
    both = [k for k, v in by_instance.items() if all(v.get(s, {}).get("proven_optimal") for s in refs)] if refs else []
    agree = [k for k in both if all(abs(by_instance[k]["dp"]["objective"] - by_instance[k][s]["objective"])
                                    <= 1e-7 * (1 + abs(by_instance[k][s]["objective"])) for s in refs)]
    if refs:
        lines.append(f"dp reaches the proven optimum on {len(agree)}/{len(both)} instances that "
                     f"{' and '.join(refs)} both solve to optimality ({len(by_instance)} instances)")
        for s in refs:
            solved = [k for k, v in by_instance.items() if v.get(s, {}).get("proven_optimal")]
            same = [k for k in solved if abs(by_instance[k]["dp"]["objective"] - by_instance[k][s]["objective"])
                    <= 1e-7 * (1 + abs(by_instance[k][s]["objective"]))]
            lines.append(f"dp equals the {s} proven optimum on {len(same)}/{len(solved)} instances {s} solves")
            for k in sorted(set(solved) - set(same)):
                lines.append(f"  MISMATCH {k}: dp {by_instance[k]['dp']['objective']!r} vs {s} "
                             f"{by_instance[k][s]['objective']!r}")
        for s in refs:
            ratios = [v[s]["dp_speedup"] for v in by_instance.values() if v.get(s, {}).get("dp_speedup")]
            solved = sum(1 for v in by_instance.values() if v.get(s, {}).get("proven_optimal"))
            if ratios:
                lines.append(f"{s}: proven optimal on {solved}/{len(by_instance)}; time / dp time: median "
                             f"{statistics.median(ratios):.0f}x (min {min(ratios):.0f}x, max {max(ratios):.0f}x)")
    dp_proven = sum(1 for v in by_instance.values() if v["dp"]["proven_optimal"])
    lines.append(f"dp proves its answer optimal on {dp_proven}/{len(by_instance)} instances")
    for solver in ("greedy", "lagrange"):
        for kind in ("convex", "nonconvex", "measured"):
            gaps = [v[solver]["rel_gap"] for k, v in by_instance.items() if k.startswith(kind + "-")
                    and v.get(solver, {}).get("rel_gap") is not None]
            if gaps:
                lines.append(f"{solver} on {kind}: relative gap to best known median {statistics.median(gaps):.2e}, "
                             f"max {max(gaps):.2e} ({len(gaps)} instances)")
    lag = [(v["dp"]["seconds"], v["dp-lagrangian"]) for k, v in by_instance.items()
           if not k.endswith(".params") and v["dp"]["seconds"] and v["dp-lagrangian"]["seconds"]]
    if lag:
        slower = [r["seconds"] / d for d, r in lag]
        exact = sum(1 for _, r in lag if r["proven_optimal"])
        gaps = [r["rel_gap"] for _, r in lag if r["rel_gap"] is not None]
        lines.append(f"dp second dimension vs Lagrangian on {len(lag)} bounded instances: Lagrangian time / exact time "
                     f"median {statistics.median(slower):.0f}x; gap closed (proven) on {exact}/{len(lag)}; "
                     f"relative gap median {statistics.median(gaps):.2e}, max {max(gaps):.2e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write result rows as JSON to this path")
    ap.add_argument("--write-instances", metavar="DIR", help="write every instance with its best known objective to DIR")
    ap.add_argument("--instances", metavar="DIR", help="run on the instance files in DIR instead of generating them")
    ap.add_argument("--only", help="comma-separated names or patterns (fnmatch: '*-llama3-8b.*') of the instances to run")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per reference solve (default: 60)")
    ap.add_argument("--threads", type=int, default=1, help="threads per reference solver (default: 1, as dp)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each of our solvers (median; default: 5)")
    ap.add_argument("--no-references", action="store_true", help="skip HiGHS and CP-SAT")
    ap.add_argument("--from-json", metavar="ROWS", help="print the summaries of rows written by --json (no solving)")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        for line in family_table(rows) + summary(rows):
            print(line)
        return 0
    rows: list[dict[str, Any]] = []
    for name, family, budget, spec in instances(args):
        mine = solve_instance(name, spec, args)
        rows += mine
        if args.write_instances:
            write_instance(Path(args.write_instances), name, family, budget, spec, mine)
        print(f"[bench] {name}: " + ", ".join(f"{r['solver']} {fmt(r['seconds'], '.3g')} s" for r in mine),
              file=sys.stderr, flush=True)
    print_tables(rows)
    for line in family_table(rows) + summary(rows):
        print(line)
    if args.json:
        write_json_atomic(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
