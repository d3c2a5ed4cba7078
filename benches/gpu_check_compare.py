"""The GPU check's agreement test: the same `layerprune prune` on the device and on the CPU must keep the same KV
heads and MLP channels in every layer, and their perplexities must agree within a tolerance (default 0.5%).

Reads the two runs' `report.json` ("layers" -> kv_heads_kept, mlp_channels_kept) and the `layerprune eval --json`
files of the device-pruned model on the device and of the CPU-pruned model on the CPU (same tokens), and optionally
the device-pruned model evaluated on the CPU (`--cross-eval`: tells a difference of the weights from one of the
runtime). Writes the verdict as JSON and exits 0 when everything agrees, 1 when something does not, 2 when an
input is missing or unreadable.

    python benches/gpu_check_compare.py --device-report A/report.json --cpu-report B/report.json \\
        --device-eval A.json --cpu-eval B.json [--cross-eval C.json] [--tolerance 0.005] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_TOLERANCE = 0.005


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} holds no JSON object")
    return data


def kept(report: dict[str, Any], what: str) -> list[tuple[list[int], list[int]]]:
    """Per layer (kept KV heads, kept MLP channels) of a prune report."""
    layers = report.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{what}: report.json has no 'layers'")
    try:
        return [(list(layer["kv_heads_kept"]), list(layer["mlp_channels_kept"])) for layer in layers]
    except (KeyError, TypeError):
        raise ValueError(f"{what}: a layer of report.json has no kv_heads_kept / mlp_channels_kept") from None


def compare_kept(device: list[tuple[list[int], list[int]]], cpu: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """Which layers differ, and by how many heads / channels (kept on one side and not on the other)."""
    if len(device) != len(cpu):
        return {"match": False, "layers": [len(device), len(cpu)], "differing_layers": [],
                "why": f"{len(device)} layers on the device, {len(cpu)} on the CPU"}
    differing = []
    for l, ((kv_d, ch_d), (kv_c, ch_c)) in enumerate(zip(device, cpu)):
        if kv_d != kv_c or ch_d != ch_c:
            differing.append({"layer": l, "kv_heads": {"device": kv_d, "cpu": kv_c},
                              "channels_only_device": len(set(ch_d) - set(ch_c)),
                              "channels_only_cpu": len(set(ch_c) - set(ch_d)),
                              "channels_kept": [len(ch_d), len(ch_c)]})
    return {"match": not differing, "layers": len(device), "differing_layers": differing,
            "kv_heads_kept": sum(len(kv) for kv, _ in device), "channels_kept": sum(len(ch) for _, ch in device),
            "kv_layers_differing": sum(d["kv_heads"]["device"] != d["kv_heads"]["cpu"] for d in differing),
            "channels_differing": sum(max(d["channels_only_device"], d["channels_only_cpu"]) for d in differing)}


def relative(a: float, b: float) -> float:
    """|a - b| / b (inf when b is 0 or either is not finite)."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.inf
    return abs(a - b) / abs(b)


def compare(device_report: dict, cpu_report: dict, device_eval: dict, cpu_eval: dict, cross_eval: dict | None,
            tolerance: float) -> dict[str, Any]:
    heads = compare_kept(kept(device_report, "device run"), kept(cpu_report, "CPU run"))
    ppl_device, ppl_cpu = float(device_eval["ppl"]), float(cpu_eval["ppl"])
    same_tokens = device_eval.get("tokens") == cpu_eval.get("tokens")
    diff = relative(ppl_device, ppl_cpu)
    out: dict[str, Any] = {
        "kept": heads,
        "ppl": {"device": ppl_device, "cpu": ppl_cpu, "relative_difference": diff, "tolerance": tolerance,
                "tokens": [device_eval.get("tokens"), cpu_eval.get("tokens")],
                "devices": [device_eval.get("device"), cpu_eval.get("device")],
                "within_tolerance": diff <= tolerance and same_tokens},
    }
    if cross_eval is not None:
        ppl_cross = float(cross_eval["ppl"])
        out["ppl"]["device_model_on_cpu"] = ppl_cross
        out["ppl"]["weights_difference"] = relative(ppl_cross, ppl_cpu)  # device-pruned vs CPU-pruned, both on CPU
        out["ppl"]["runtime_difference"] = relative(ppl_device, ppl_cross)  # the same weights, device vs CPU
    timings = {"device": device_report.get("timings"), "cpu": cpu_report.get("timings")}
    out["timings"] = timings
    out["agree"] = bool(heads["match"] and out["ppl"]["within_tolerance"])
    problems = []
    if not heads["match"]:
        problems.append(heads.get("why") or f"kept heads / channels differ in {len(heads['differing_layers'])} layer(s)")
    if not same_tokens:
        problems.append(f"the two evaluations read different token counts {out['ppl']['tokens']}")
    if diff > tolerance:
        problems.append(f"PPL differs by {100 * diff:.3f}% (device {ppl_device:.4f}, CPU {ppl_cpu:.4f}; "
                        f"tolerance {100 * tolerance:.2f}%)")
    out["problems"] = problems
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device-report", type=Path, required=True, help="report.json of the prune on the device")
    ap.add_argument("--cpu-report", type=Path, required=True, help="report.json of the same prune on the CPU")
    ap.add_argument("--device-eval", type=Path, required=True, help="eval JSON: the device-pruned model on the device")
    ap.add_argument("--cpu-eval", type=Path, required=True, help="eval JSON: the CPU-pruned model on the CPU")
    ap.add_argument("--cross-eval", type=Path, default=None, help="eval JSON: the device-pruned model on the CPU")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"largest relative PPL difference (default {DEFAULT_TOLERANCE})")
    ap.add_argument("--json", type=Path, default=None, help="write the verdict here")
    args = ap.parse_args(argv)
    try:
        result = compare(_read(args.device_report, "device run"), _read(args.cpu_report, "CPU run"),
                         _read(args.device_eval, "device eval"), _read(args.cpu_eval, "CPU eval"),
                         None if args.cross_eval is None or not args.cross_eval.is_file()
                         else _read(args.cross_eval, "cross eval"), args.tolerance)
    except (ValueError, KeyError, TypeError) as err:
        print(f"gpu_check_compare: {err}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, args.json)
    heads, ppl = result["kept"], result["ppl"]
    print(f"kept KV heads and MLP channels: {'the same in all ' + str(heads['layers']) + ' layers' if heads['match'] else 'DIFFERENT'}")
    line = (f"PPL: device {ppl['device']:.4f}, CPU {ppl['cpu']:.4f}: {100 * ppl['relative_difference']:.4f}% apart "
            f"(tolerance {100 * ppl['tolerance']:.2f}%)")
    if "device_model_on_cpu" in ppl:
        line += (f"; the device-pruned model on the CPU {ppl['device_model_on_cpu']:.4f} (weights "
                 f"{100 * ppl['weights_difference']:.4f}%, runtime {100 * ppl['runtime_difference']:.4f}%)")
    print(line)
    for problem in result["problems"]:
        print(f"MISMATCH: {problem}")
    return 0 if result["agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
