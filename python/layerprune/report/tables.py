"""Writing the results of `layerprune compare`: report.json (machine-readable) and report.md
(the table a person reads first, the verdict per ratio, per-layer tables, generations side by side).

Every file is written to a temporary path in the same folder and renamed over the target, so a
reader never sees a half-written report and a crash leaves the previous one intact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from layerprune.atomic import write_json_atomic, write_text_atomic

SCHEMA = "layerprune.compare/1"
DENSE = "dense"
UNIFORM_METHODS = ("uniform", "uniform-range", "uniform-refit", "uniform-obs", "uniform-homogeneous")
SEED_METHOD = "unbalanced-seed"
PEER_METHODS = ("flap", "slimgpt")  # published methods reimplemented: `unbalanced` should beat them too
BEST_METHOD = "unbalanced"
# the quality bar users check: `unbalanced` at least this much lower PPL than the better uniform method
QUALITY_BAR_REL = 0.10
REQUIRED_RUN_KEYS = ("method", "target_ratio", "actual_ratio", "params", "ppl", "tokens")


# --------------------------------------------------------------------------- verdicts


def relative_difference(value: float, reference: float) -> float:
    """(value - reference) / reference: negative when `value` is lower (better for perplexity)."""
    return (value - reference) / reference


def _runs_at(runs: Iterable[Mapping[str, Any]], ratio: float) -> dict[str, Mapping[str, Any]]:
    return {r["method"]: r for r in runs if r["method"] != DENSE and math.isclose(r["target_ratio"], ratio)}


def target_ratios(runs: Iterable[Mapping[str, Any]]) -> list[float]:
    seen: list[float] = []
    for run in runs:
        if run["method"] != DENSE and not any(math.isclose(run["target_ratio"], r) for r in seen):
            seen.append(float(run["target_ratio"]))
    return sorted(seen)


def verdicts(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per target ratio: the winner (lowest PPL), and `unbalanced` against the better of the uniform
    methods and against `unbalanced-seed`, as relative PPL differences (negative = unbalanced lower)."""
    out = []
    for ratio in target_ratios(runs):
        at = _runs_at(runs, ratio)
        winner = min(at.values(), key=lambda r: r["ppl"])
        entry: dict[str, Any] = {"target_ratio": ratio, "winner": winner["method"], "winner_ppl": winner["ppl"]}
        others = [r for r in at.values() if r is not winner]
        if others:
            runner = min(others, key=lambda r: r["ppl"])
            entry["runner_up"] = runner["method"]
            entry["winner_vs_runner_up"] = relative_difference(winner["ppl"], runner["ppl"])
        best = at.get(BEST_METHOD)
        uniforms = [at[m] for m in UNIFORM_METHODS if m in at]
        if best is not None and uniforms:
            best_uniform = min(uniforms, key=lambda r: r["ppl"])
            entry["best_uniform"] = best_uniform["method"]
            entry["best_uniform_ppl"] = best_uniform["ppl"]
            entry["unbalanced_vs_best_uniform"] = relative_difference(best["ppl"], best_uniform["ppl"])
        if best is not None and SEED_METHOD in at:
            entry["seed_ppl"] = at[SEED_METHOD]["ppl"]
            entry["unbalanced_vs_seed"] = relative_difference(best["ppl"], at[SEED_METHOD]["ppl"])
        peers = {m: at[m]["ppl"] for m in PEER_METHODS if m in at}
        if best is not None and peers:
            entry["peer_ppl"] = peers
            entry["unbalanced_vs_peers"] = {m: relative_difference(best["ppl"], p) for m, p in peers.items()}
        if "unbalanced_vs_best_uniform" in entry and "unbalanced_vs_seed" in entry:
            entry["quality_bar_met"] = bool(
                entry["unbalanced_vs_best_uniform"] <= -QUALITY_BAR_REL and entry["unbalanced_vs_seed"] < 0
                and all(d < 0 for d in entry.get("unbalanced_vs_peers", {}).values())
            )
        out.append(entry)
    return out


def _pct(rel: float) -> str:
    return f"{abs(rel) * 100:.1f}% {'lower' if rel < 0 else 'higher'}"


def verdict_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain sentences: who won at each ratio, by how much, and whether the expected winner won."""
    lines = []
    for v in entries:
        ratio = v["target_ratio"]
        head = f"- **Ratio {ratio:g}: `{v['winner']}` wins** with PPL {v['winner_ppl']:.3f}"
        if "runner_up" in v:
            head += f" ({_pct(v['winner_vs_runner_up'])} than the runner-up `{v['runner_up']}`)"
        lines.append(head + ".")
        if "unbalanced_vs_best_uniform" in v:
            lines.append(
                f"  - `{BEST_METHOD}` PPL is {_pct(v['unbalanced_vs_best_uniform'])} than the better uniform method "
                f"`{v['best_uniform']}` (PPL {v['best_uniform_ppl']:.3f})"
                + (
                    f" and {_pct(v['unbalanced_vs_seed'])} than `{SEED_METHOD}` (PPL {v['seed_ppl']:.3f})."
                    if "unbalanced_vs_seed" in v
                    else "."
                )
            )
        elif "unbalanced_vs_seed" in v:
            lines.append(f"  - `{BEST_METHOD}` PPL is {_pct(v['unbalanced_vs_seed'])} than `{SEED_METHOD}`.")
        if "unbalanced_vs_peers" in v:
            lines.append("  - Against the published methods: " + "; ".join(
                f"{_pct(d)} than `{m}` (PPL {v['peer_ppl'][m]:.3f})" for m, d in v["unbalanced_vs_peers"].items()) + ".")
        if v["winner"] != BEST_METHOD and any(k.startswith("unbalanced_vs") for k in v):
            lines.append(f"  - The expected winner `{BEST_METHOD}` did NOT win at this ratio.")
        if "quality_bar_met" in v:
            lines.append(
                f"  - Quality bar (`{BEST_METHOD}` >= {QUALITY_BAR_REL:.0%} lower PPL than the better uniform method, "
                f"lower than `{SEED_METHOD}`"
                + (" and than " + " and ".join(f"`{m}`" for m in v["unbalanced_vs_peers"]) if "unbalanced_vs_peers" in v
                   else "")
                + f"): **{'met' if v['quality_bar_met'] else 'NOT met'}**."
            )
    return lines


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ⏎ ")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def sorted_runs(runs: Sequence[Mapping[str, Any]], method_order: Sequence[str]) -> list[Mapping[str, Any]]:
    rank = {m: i for i, m in enumerate(method_order)}
    return sorted(runs, key=lambda r: (r["target_ratio"], rank.get(r["method"], len(rank)), r["method"]))


def main_table(runs: Sequence[Mapping[str, Any]], method_order: Sequence[str] = ()) -> str:
    """The first table of the report: one row per model (dense first, then by ratio and method)."""
    dense = next((r for r in runs if r["method"] == DENSE), None)
    rows = []
    for r in sorted_runs(runs, method_order):
        delta = "-" if dense is None or r is dense else f"{relative_difference(r['ppl'], dense['ppl']) * 100:+.1f}%"
        rows.append(
            [
                r["method"],
                f"{r['target_ratio']:.3f}" if r["method"] != DENSE else "-",
                f"{r['actual_ratio']:.4f} / {_fmt(r.get('actual_ratio_layers'), '.4f')}",
                f"{_fmt(r.get('actual_kv_cache_ratio'), '.4f')} / {_fmt(r.get('actual_flops_ratio'), '.4f')}",
                f"{r['params']:,}",
                f"{r['ppl']:.3f}",
                delta,
                _fmt(None if r.get("size_bytes") is None else r["size_bytes"] / 1e6, ".1f"),
                _fmt(r.get("tokens_per_s"), ".0f"),
            ]
        )
    header = ["method", "target ratio", "actual ratio (all / decoder)", "KV-cache / FLOPs ratio", "params", "PPL",
              "Δ PPL vs dense", "size MB", "tok/s"]
    return "\n".join(_table(header, rows))


def _importance_section(layer_importance: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not layer_importance:
        return []
    columns: list[tuple[str, list[Any]]] = []
    for name, li in layer_importance.items():
        for part in ("attn", "mlp", "combined"):
            values = li.get(part)
            if values is not None:
                columns.append((f"{name} {part}", list(values)))
    if not columns:
        return []
    n_layers = max(len(v) for _, v in columns)
    rows = [
        [str(i)] + [_fmt(v[i] if i < len(v) else None, ".4g") for _, v in columns] for i in range(n_layers)
    ]
    seconds = ", ".join(
        f"{name}: {li['seconds']:.1f} s" for name, li in layer_importance.items() if li.get("seconds") is not None
    )
    out = ["## Per-layer importance", ""]
    out.append(
        "Layer importance measured on calibration data (never the test split); computed once and reused by every "
        "method and ratio" + (f" ({seconds})." if seconds else ".")
    )
    out += ["", *_table(["layer", *[c for c, _ in columns]], rows), ""]
    return out


def _allocation_section(runs: Sequence[Mapping[str, Any]], method_order: Sequence[str]) -> list[str]:
    out: list[str] = []
    dense = next((r for r in runs if r["method"] == DENSE), None)
    for ratio in target_ratios(runs):
        at = [r for r in sorted_runs(list(_runs_at(runs, ratio).values()), method_order) if r.get("layers")]
        if not at:
            continue
        n_layers = max(len(r["layers"]) for r in at)
        header = ["layer"]
        if dense is not None and dense.get("layers"):
            header.append("dense KV / MLP")
        header += [f"{r['method']} KV / MLP" for r in at]
        rows = []
        for i in range(n_layers):
            row = [str(i)]
            if dense is not None and dense.get("layers"):
                d = dense["layers"][i]
                row.append(f"{d['kv_groups_kept']} / {d['mlp_kept']}")
            for r in at:
                layer = r["layers"][i] if i < len(r["layers"]) else None
                row.append("-" if layer is None else f"{layer['kv_groups_kept']} / {layer['mlp_kept']}")
            rows.append(row)
        out += [f"## Kept KV groups / MLP channels per layer, target ratio {ratio:g}", "", *_table(header, rows), ""]
    return out


def _generation_section(runs: Sequence[Mapping[str, Any]], prompts: Sequence[str], method_order: Sequence[str]) -> list[str]:
    if not prompts:
        return []
    out = ["## Greedy generations", ""]
    ordered = [r for r in sorted_runs(runs, method_order) if r.get("generations")]
    for k, prompt in enumerate(prompts):
        out += [f"**Prompt {k + 1}:** `{_cell(prompt)}`", ""]
        rows = []
        for r in ordered:
            label = r["method"] if r["method"] == DENSE else f"{r['method']} @ {r['target_ratio']:g}"
            text = r["generations"][k] if k < len(r["generations"]) else ""
            rows.append([label, _cell(text)])
        out += _table(["model", "continuation"], rows, align="ll") + [""]
    return out


STAGE_ORDER = ("layer_importance", "scoring", "allocation", "pruning", "prune_total", "eval", "throughput",
               "generate", "save")


def _timing_section(runs: Sequence[Mapping[str, Any]], method_order: Sequence[str]) -> list[str]:
    stages: list[str] = [s for s in STAGE_ORDER if any(s in (r.get("seconds") or {}) for r in runs)]
    for r in runs:
        for key in (r.get("seconds") or {}):
            if key not in stages:
                stages.append(key)
    if not stages:
        return []
    rows = []
    for r in sorted_runs(runs, method_order):
        sec = r.get("seconds") or {}
        rows.append([r["method"], "-" if r["method"] == DENSE else f"{r['target_ratio']:g}",
                     *[_fmt(sec.get(s), ".1f") for s in stages]])
    note = ("`layer_importance` is computed once per model and shared by every run that uses it (its one-off time is "
            "shown on each); `scoring` is the element scores inside `prune`; `prune_total` is the whole `prune` call.")
    return ["## Wall time per stage (seconds)", "", note, "", *_table(["method", "ratio", *stages], rows), ""]


def _param_match_section(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    if not entries:
        return []
    rows = [
        [f"{e['target_ratio']:g}", e["a"], e["b"], f"{e['params_a']:,}", f"{e['params_b']:,}", f"{e['difference']:+,}",
         f"{e['granule']:,}", "yes" if e["within_granule"] else "NO"]
        for e in entries
    ]
    header = ["ratio", "method A", "method B", "params A", "params B", "B - A", "granule", "within one granule"]
    return ["## Equal terms: parameter counts", "",
            "`uniform` and `unbalanced` target the same parameter budget and must land within one granule of "
            "each other (the allocation's stated precision; one KV group when no allocation recorded it).", "",
            *_table(header, rows, align="rlllrrrl"), ""]


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md from the report.json object."""
    runs = report["runs"]
    order = report.get("methods") or []
    settings = report.get("settings", {})
    lines = [f"# layerprune compare: {report.get('model', '?')}", ""]
    lines.append("Command: `" + " ".join(report.get("command", [])) + "`")
    dense = next((r for r in runs if r["method"] == DENSE), None)
    if dense is not None:
        lines.append(
            f"Evaluation: {settings.get('dataset', 'wikitext2')} test split, the same {dense['tokens']:,} tokens for "
            f"every model, windows of {dense.get('seq_len', settings.get('seq_len'))} tokens "
            f"({dense.get('predicted_tokens', '?')} predicted tokens). "
            f"Calibration: {settings.get('calib_samples')} x {settings.get('calib_seq_len')} tokens of the "
            f"{settings.get('calib_split', 'validation')} split, seed {settings.get('seed')}."
        )
    if settings.get("device"):
        lines.append(f"Device: {settings['device']} (throughput is forward tokens/s at batch 1 on this device).")
    lines += ["", "## Results", "", main_table(runs, order), ""]
    lines += ["## Verdict", ""]
    v_lines = verdict_lines(report.get("verdicts") or verdicts(runs))
    lines += v_lines if v_lines else ["No pruned runs to compare."]
    lines.append("")
    lines += _param_match_section(report.get("param_match") or [])
    notes = report.get("method_notes") or {}
    if notes:
        lines += ["## Methods", ""] + [f"- `{m}`: {text}" for m, text in notes.items()] + [""]
    lines += _importance_section(report.get("layer_importance") or {})
    lines += _allocation_section(runs, order)
    lines += _generation_section(runs, report.get("prompts") or [], order)
    lines += _timing_section(runs, order)
    plots = report.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def validate_report(report: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first missing field of a report object (schema check used by tests and
    before writing)."""
    for key in ("schema", "command", "versions", "runs"):
        if key not in report:
            raise ValueError(f"report is missing '{key}'")
    for i, run in enumerate(report["runs"]):
        for key in REQUIRED_RUN_KEYS:
            if key not in run:
                raise ValueError(f"report runs[{i}] ({run.get('method', '?')}) is missing '{key}'")


def write_report(out_dir: str | os.PathLike[str], report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write DIR/report.json and DIR/report.md (each temp + rename). Returns their paths."""
    validate_report(report)
    out = Path(out_dir)
    json_path = write_json_atomic(out / "report.json", report)
    md_path = write_text_atomic(out / "report.md", render_markdown(report))
    return json_path, md_path
