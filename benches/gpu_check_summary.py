"""The GPU check's bookkeeping: one JSON file per step, and the summary table at the end.

`record` writes `OUT/steps/NN_NAME.json` for a step `benches/gpu_check.sh` ran (or could not run): its status,
exit code, seconds, time limit, log, and the figures read from what it wrote (report.json timings, perplexity,
per-layer times and peak device memory, test counts, kernel speed-ups). `table` reads every step file of `OUT`,
prints one table, writes `OUT/summary.json` and exits 0 when every step passed (a step skipped on purpose, such as
`heal` before it exists, passes), else 1.

Statuses: `ok`; `failed` (non-zero exit); `timeout` (its time limit ran out); `not-run` (a prerequisite is
missing: no compiled layerprune._core, no model, no data, an earlier step failed, the time budget spent: a
failure); `skipped` (on purpose, with the reason printed: not a failure).

    python benches/gpu_check_summary.py record OUT NAME KIND STATUS [--rc N] [--seconds S] [--limit S]
        [--reason TEXT] [--log FILE] [--artifact PATH ...]
    python benches/gpu_check_summary.py table OUT [--wall SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

STATUSES = ("ok", "failed", "timeout", "not-run", "skipped")
PASSING = ("ok", "skipped")
GB = 10**9


def _load(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _log_tail(log: str | None, lines: int = 400) -> str:
    if not log:
        return ""
    try:
        return "\n".join(Path(log).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---- what each kind of step yields: (details for the JSON, one line for the table) -------------------------


def _prune(artifacts: list[str], log: str) -> tuple[dict, str]:
    report = _load(Path(artifacts[0]) / "report.json") if artifacts else None
    if not isinstance(report, dict):
        return {}, ""
    timings = report.get("timings", {})
    details = {"timings": timings, "actual_ratio": report.get("actual_ratio"), "method": report.get("method"),
               "params_before": report.get("params_before"), "params_after": report.get("params_after"),
               "kv_heads_kept": sum(len(l.get("kv_heads_kept", [])) for l in report.get("layers", [])),
               "channels_kept": sum(len(l.get("mlp_channels_kept", [])) for l in report.get("layers", []))}
    stages = ", ".join(f"{k} {float(v):.1f}" for k, v in timings.items() if k != "total" and float(v) >= 0.05)
    total = timings.get("total")
    line = f"ratio {report.get('actual_ratio', float('nan')):.4f}; total {float(total):.1f} s ({stages})" \
        if total is not None else ""
    return details, line


def _eval(artifacts: list[str], log: str) -> tuple[dict, str]:
    data = _load(artifacts[0]) if artifacts else None
    if not isinstance(data, dict):
        return {}, ""
    details = {k: data.get(k) for k in ("ppl", "nll", "tokens", "device", "dtype", "eval_seconds", "seconds")}
    return details, (f"PPL {data['ppl']:.4f} on {data['tokens']:,} tokens ({data.get('device')}; "
                     f"{data.get('eval_seconds', 0):.1f} s)")


def _compare(artifacts: list[str], log: str) -> tuple[dict, str]:
    data = _load(artifacts[0]) if artifacts else None
    if not isinstance(data, dict):
        return {}, ""
    kept, ppl = data["kept"], data["ppl"]
    heads = "same kept heads/channels" if kept["match"] else (
        f"kept heads/channels DIFFER in {len(kept['differing_layers']) or 'all'} layers "
        f"(KV heads in {kept.get('kv_layers_differing', '?')}, {kept.get('channels_differing', '?')} of "
        f"{kept.get('channels_kept', '?')} channels)")
    return ({"agree": data["agree"], "problems": data["problems"], "ppl": ppl, "kept_match": kept["match"]},
            f"{heads}; PPL {100 * ppl['relative_difference']:.3f}% apart (max {100 * ppl['tolerance']:.1f}%)")


def _sequential(artifacts: list[str], log: str) -> tuple[dict, str]:
    data = _load(artifacts[0]) if artifacts else None
    if not isinstance(data, dict):
        return {}, ""
    per_layer = data.get("seconds_per_layer") or [float("nan")]
    big = data.get("projections", {}).get("Llama-3-70B", {})
    peak_device = data.get("peak_device_bytes")
    details = {"shape": data.get("shape"), "layers": data.get("layers"), "device": data.get("device"),
               "device_name": data.get("device_name"), "seconds_per_layer": per_layer,
               "median_seconds_per_layer": statistics.median(per_layer), "peak_device_bytes": peak_device,
               "peak_rss_bytes": data.get("peak_rss_bytes"), "checkpoint_bytes": data.get("checkpoint_bytes"),
               "write_checkpoint_seconds": data.get("write_checkpoint_seconds"),
               "timings": data.get("run", {}).get("timings"), "projected_70b": big}
    memory = f"peak {peak_device / GB:.2f} GB device" if peak_device is not None else \
        f"peak RSS {data.get('peak_rss_bytes', 0) / GB:.2f} GB"
    line = (f"{data.get('shape')} x {data.get('layers')} layers: {statistics.median(per_layer):.2f} s/layer, {memory}; "
            f"70B projected {big.get('total_seconds', float('nan')) / 60:.0f} min, "
            f"{big.get('device_bytes', float('nan')) / GB:.1f} GB device")
    return details, line


def _pytest(artifacts: list[str], log: str) -> tuple[dict, str]:
    found = re.findall(r"=*\s*((?:\d+ \w+(?:, )?)+) in ([\d.]+)s", log)
    if not found:
        return {}, ""
    counts, seconds = found[-1]
    return {"result": counts, "pytest_seconds": float(seconds)}, counts


def _bench_scoring(artifacts: list[str], log: str) -> tuple[dict, str]:
    data = _load(artifacts[0]) if artifacts else None
    rows = data.get("rows", []) if isinstance(data, dict) else []
    ours = [r for r in rows if r.get("backend") in ("triton", "rust")]
    if not ours:
        return {}, ""
    backend = "triton" if any(r["backend"] == "triton" for r in ours) else "rust"
    ours = [r for r in ours if r["backend"] == backend]
    speedups = [r["speedup_vs_eager"] for r in ours]
    copy = [r["copy_fraction"] for r in ours]
    details = {"backend": backend, "rows": len(ours), "min_speedup_vs_eager": min(speedups),
               "median_speedup_vs_eager": statistics.median(speedups), "min_copy_fraction": min(copy),
               "median_copy_fraction": statistics.median(copy)}
    return details, (f"{backend}: x{statistics.median(speedups):.1f} eager (min x{min(speedups):.1f}), "
                     f"{100 * statistics.median(copy):.0f}% of copy (min {100 * min(copy):.0f}%) over {len(ours)} rows")


def _tune(artifacts: list[str], log: str) -> tuple[dict, str]:
    data = _load(artifacts[0]) if artifacts else None
    rows = data.get("rows", []) if isinstance(data, dict) else []
    if not rows:
        return {}, ""
    defaults = [r for r in rows if r.get("is_default")]
    cases = {(r["op"], r["shape"], r["dtype"]) for r in rows}
    ranks = [r["rank"] for r in defaults]
    return ({"rows": len(rows), "cases": len(cases), "default_ranks": ranks},
            f"{len(rows)} launch configs over {len(cases)} cases; the defaults rank "
            f"{', '.join(str(r) for r in ranks) or 'nowhere'}")


def _plain(artifacts: list[str], log: str) -> tuple[dict, str]:
    return {}, ""


def _last_line(artifacts: list[str], log: str) -> tuple[dict, str]:
    lines = [l.strip() for l in log.splitlines() if l.strip() and not l.startswith("$ ")]
    return {}, (lines[-1][:160] if lines else "")


KINDS = {"prune": _prune, "eval": _eval, "compare": _compare, "sequential": _sequential, "pytest": _pytest,
         "bench_scoring": _bench_scoring, "tune": _tune, "plain": _plain, "heal": _plain, "model": _last_line}


def record(args: argparse.Namespace) -> int:
    out = Path(args.out)
    steps = out / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    index = len(list(steps.glob("*.json"))) + 1
    log = _log_tail(args.log)
    details, line = {}, ""
    if args.status in ("ok", "failed", "timeout"):
        try:
            details, line = KINDS[args.kind](args.artifact or [], log)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, statistics.StatisticsError) as err:
            details, line = {"unreadable": f"{type(err).__name__}: {err}"}, ""
    if args.status in ("failed", "timeout") and not args.reason:
        last = [l for l in log.splitlines() if l.strip()]
        args.reason = (f"time limit of {args.limit:.0f} s ran out" if args.status == "timeout"
                       else (last[-1].strip()[:300] if last else f"exit {args.rc}"))
    data = {"step": args.name, "index": index, "kind": args.kind, "status": args.status, "rc": args.rc,
            "seconds": round(args.seconds, 3), "limit_seconds": args.limit, "reason": args.reason or None,
            "result": line, "details": details, "artifacts": args.artifact or [], "log": args.log}
    _write(steps / f"{index:02d}_{args.name}.json", data)
    return 0


def read_steps(out: Path) -> list[dict[str, Any]]:
    steps = [_load(p) for p in sorted((out / "steps").glob("*.json"))]
    return sorted((s for s in steps if isinstance(s, dict)), key=lambda s: s.get("index", 0))


def table(args: argparse.Namespace) -> int:
    out = Path(args.out)
    steps = read_steps(out)
    env = _load(out / "env.json") or {}
    if args.wall is not None:
        env["wall_seconds"] = args.wall
        _write(out / "env.json", env)
    if env:
        print(f"\n== GPU check summary: {env.get('device_name', '?')}, torch {env.get('torch', '?')}, "
              f"triton {env.get('triton', '?')}, transformers {env.get('transformers', '?')}; "
              f"layerprune._core {'built' if env.get('core') else 'MISSING'}; {'quick' if env.get('quick') else 'full'} run, "
              f"{env.get('wall_seconds', 0):.0f} s of a {env.get('budget_seconds', '?')} s budget")
    rows = [("step", "status", "seconds", "result")]
    for s in steps:
        text = s.get("result") or ""
        if s["status"] not in ("ok",) and s.get("reason"):
            text = (text + "; " if text else "") + str(s["reason"])
        rows.append((s["step"], s["status"], f"{s.get('seconds', 0):.1f}", text))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print(f"{r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]:>{widths[2]}} | {r[3]}")
        if i == 0:
            print("-" * (sum(widths) + 6) + "-+-" + "-" * 40)
    bad = [s["step"] for s in steps if s["status"] not in PASSING]
    verdict = "every step passed" if not bad else f"{len(bad)} step(s) did not pass: {', '.join(bad)}"
    print(f"\ngpu_check: {verdict} ({len(steps)} steps; JSON per step in {out / 'steps'})")
    _write(out / "summary.json", {"env": env, "steps": steps, "passed": not bad, "not_passed": bad})
    return 0 if not bad and steps else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="write one step's JSON")
    rec.add_argument("out")
    rec.add_argument("name")
    rec.add_argument("kind", choices=sorted(KINDS))
    rec.add_argument("status", choices=STATUSES)
    rec.add_argument("--rc", type=int, default=None)
    rec.add_argument("--seconds", type=float, default=0.0)
    rec.add_argument("--limit", type=float, default=0.0)
    rec.add_argument("--reason", default=None)
    rec.add_argument("--log", default=None)
    rec.add_argument("--artifact", action="append")
    rec.set_defaults(run=record)
    tab = sub.add_parser("table", help="print the summary table, write summary.json")
    tab.add_argument("out")
    tab.add_argument("--wall", type=float, default=None, help="the check's wall time, added to env.json")
    tab.set_defaults(run=table)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
