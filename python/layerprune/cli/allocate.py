"""`layerprune allocate`: solve a per-layer pruning allocation, or write a spec for a model.

    layerprune allocate --spec SPEC.json [--solver dp] [--json OUT]
    layerprune allocate --spec-from-model M --ratio R [--kv-cache-ratio K] [--flops-ratio F] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from layerprune.allocation import SOLVERS, AllocationResult, allocate, load_spec, spec_from_model_config, spec_to_json
from layerprune.atomic import write_json_atomic
from layerprune.errors import InvalidInputError, ModelError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "allocate",
        help="per-layer KV groups / MLP channels under an exact parameter budget",
        description="Solve a pruning allocation (uniform, seed, greedy, lagrange, dp, homogeneous) from a spec JSON, "
        "or write a spec for a model from its config.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="allocation spec JSON (ratio, layers, constraints, importance or curves)")
    src.add_argument("--spec-from-model", metavar="MODEL", help="write a spec for MODEL (HF folder with config.json, or smollm2-135m)")
    p.add_argument("--solver", default="dp", choices=SOLVERS, help="solver (default: dp)")
    p.add_argument("--ratio", type=float, help="fraction of ALL parameters to remove (with --spec-from-model)")
    p.add_argument("--kv-cache-ratio", type=float, help="with --spec-from-model: also remove at least this fraction "
                   "of the KV-cache bytes per token")
    p.add_argument("--flops-ratio", type=float, help="with --spec-from-model: also remove at least this fraction of "
                   "the FLOPs per token")
    p.add_argument("--flops-seq-len", type=int, default=2048, help="positions of the FLOPs count (default: 2048)")
    p.add_argument("--json", metavar="OUT", help="write JSON to OUT ('-' = stdout)")
    p.set_defaults(run=run)


def _model_config(name: str) -> Any:
    folder = Path(name).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ModelError(f"--spec-from-model: {folder} has no config.json")
        try:
            return json.loads(config_file.read_text())
        except ValueError as exc:
            raise ModelError(f"--spec-from-model: cannot parse {config_file}: {exc}") from None
    try:
        from layerprune.models import load_config
    except ImportError:
        raise ModelError(f"--spec-from-model: {name} is not a folder with config.json") from None
    return load_config(name)


def format_table(result: AllocationResult) -> str:
    lines = [f"{'layer':>5} {'kv_kept':>7} {'q_kept':>6} {'mlp_kept':>8} {'attn_rate':>9} {'mlp_rate':>8} {'params_kept':>12}"]
    for i, la in enumerate(result.layers):
        lines.append(
            f"{i:>5} {la.kv_groups_kept:>7} {la.q_heads_kept:>6} {la.mlp_kept:>8} {la.attn_rate:>9.4f} {la.mlp_rate:>8.4f} {la.params_kept:>12,}"
        )
    window = ("no parameter budget" if result.target_removed is None
              else f"target {result.target_removed:,} + granule {result.granule:,}")
    lines.append(
        f"solver {result.solver}: params {result.params_before:,} -> {result.params_after:,} "
        f"(removed {result.params_removed:,}; {window})"
    )
    lines.append(
        f"actual_ratio {result.actual_ratio:.6f} (all params), actual_ratio_layers {result.actual_ratio_layers:.6f} (decoder layers), "
        f"objective {result.objective:.6g}, {result.solve_seconds * 1e3:.2f} ms"
    )
    def bound(target: int | None) -> str:
        return "" if target is None else f", at least {target:,} removed"

    lines.append(
        f"actual_kv_cache_ratio {result.actual_kv_cache_ratio:.6f} (KV-cache bytes per token {result.kv_cache_bytes_before:,} -> "
        f"{result.kv_cache_bytes_after:,}{bound(result.target_kv_cache_removed)}), actual_flops_ratio "
        f"{result.actual_flops_ratio:.6f} (FLOPs per token at {result.flops_seq_len} positions {result.flops_before:,} -> "
        f"{result.flops_after:,}{bound(result.target_flops_removed)})"
    )
    if result.solver == "dp":
        lines.append("proven optimal" if result.proven_optimal else
                     f"not proven optimal: certified lower bound {result.lower_bound:.6g}")
    lines.append(f"binding: {', '.join(result.binding) or '-'}")
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)


def _emit(data: dict[str, Any], out: str | None) -> None:
    if out == "-":
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif out:
        write_json_atomic(out, data)


def run(args: argparse.Namespace) -> int:
    if args.spec_from_model:
        if args.ratio is None and args.kv_cache_ratio is None and args.flops_ratio is None:
            raise InvalidInputError("--ratio: required with --spec-from-model (or --kv-cache-ratio / --flops-ratio)")
        spec = spec_from_model_config(_model_config(args.spec_from_model), args.ratio, kv_cache_ratio=args.kv_cache_ratio,
                                      flops_ratio=args.flops_ratio, flops_seq_len=args.flops_seq_len)
        data = spec_to_json(spec)
        _emit(data, args.json)
        if args.json != "-":
            s = spec.layers[0]
            print(
                f"spec for {args.spec_from_model}: {len(spec.layers)} layers, hidden {s.hidden}, heads {s.num_q_heads}/{s.num_kv_heads}, "
                f"head_dim {s.head_dim}, MLP {s.intermediate}; {spec.params_total:,} params ({spec.extra_params:,} outside decoder layers)"
            )
            if not args.json:
                print("(pass --json OUT to write it; add importance or curves before solving with greedy/lagrange/dp/seed)")
        return 0
    for flag, value in (("--ratio", args.ratio), ("--kv-cache-ratio", args.kv_cache_ratio), ("--flops-ratio", args.flops_ratio)):
        if value is not None:
            raise InvalidInputError(f"{flag}: only with --spec-from-model (the spec file carries its budgets)")
    result = allocate(load_spec(args.spec), solver=args.solver)
    _emit(result.to_json(), args.json)
    if args.json != "-":
        print(format_table(result))
    return 0
