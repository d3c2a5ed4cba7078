"""`layerprune compare`: uniform vs unbalanced structured pruning on equal terms.

For each target ratio R (fraction of ALL parameters removed) the same dense model is pruned by

* ``uniform-range``: LLM-Pruner's ``llama3.py`` block-wise setting: one per-layer rate for the layers
  in ``[3, L-1)`` (its defaults ``block_{attention,mlp}_layer_start=3``, ``..._end=31`` on a 32-layer
  model: the first three layers and the last one are kept), KV groups and channels removed
  ``floor(rate * n)``. The rate is chosen by bisection on the parameter count alone (no data) so the
  whole model lands as close as possible to R; the ratio really achieved is reported.
* ``uniform``: one rate for every layer, matched to the exact parameter budget ``R * total``.
* ``unbalanced-seed``: the reference mapping: layer importance by removal, inverse mapping to
  per-layer rates, minimum effective rate 0.15 (ratio achieved reported as is).
* ``unbalanced``: sensitivity curves + the exact dynamic-programming allocation at the same budget.

Each model is evaluated on the SAME WikiText-2 test tokens (non-overlapping windows), saved with
`save_pruned` (its safetensors size is reported), timed (forward tokens/s) and asked for greedy
continuations of fixed prompts. Layer importance is computed once per model and method, cached in
``DIR/layer_importance/`` and reused by every method and ratio. Every finished run is persisted at
once to ``DIR/runs/<ratio>/<method>.json`` (:mod:`layerprune.compare.store`) and reused when the
command is re-run with the same settings. Everything that chooses (importance, scores, allocation) uses
calibration data only; the test split is only read by the evaluation.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from layerprune import report as report_mod
from layerprune.arch import decoder_layers, per_token_costs
from layerprune.compare.matching import granule_params, range_rate_for_ratio, seed_ratio_for_ratio
from layerprune.compare.settings import (
    LAYER_IMPORTANCE_FOR,
    METHOD_NOTES,
    REFIT_METHODS,
    CompareSettings,
    prune_config,
    reference_range,
    validate_settings,
)
from layerprune.compare.store import RunStore, fingerprint, model_dir, ratio_key
from layerprune.data import (
    calibration_batch,
    calibration_source,
    check_disjoint,
    eval_tokens,
    is_text_file_dataset,
    text_source,
)
from layerprune.evaluation import generate_greedy, perplexity, throughput
from layerprune.export import save_pruned
from layerprune.models import count_parameters, model_info
from layerprune.provenance import command_line, versions
from layerprune.pruning import pipeline
from layerprune.report import plots
from layerprune.faults import fault_point

def layer_table(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per-layer widths read from the model itself (KV groups, query heads, MLP channels)."""
    info = model_info(model)
    return [
        {"layer": i, "kv_groups_kept": kv, "q_heads_kept": h, "mlp_kept": m}
        for i, (kv, h, m) in enumerate(zip(info["kv_heads"], info["heads"], info["intermediate"]))
    ]


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def measure_size(model: torch.nn.Module, tokenizer: Any, target: Path | None, report: dict[str, Any] | None) -> tuple[int, str | None]:
    """Save with `save_pruned` (to `target`, or a temporary folder deleted afterwards) and return the
    weights' size in bytes and the folder kept (or None)."""
    if target is not None:
        folder = save_pruned(model, tokenizer, target, report=report, overwrite=True)
        return safetensors_bytes(folder), str(folder)
    with tempfile.TemporaryDirectory(prefix="layerprune-size-") as tmp:
        folder = save_pruned(model, None, Path(tmp) / "model")
        return safetensors_bytes(folder), None


def _device_name(model: torch.nn.Module) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def measure_model(
    model: torch.nn.Module,
    tokenizer: Any,
    eval_ids: torch.Tensor,
    settings: CompareSettings,
    *,
    save_to: Path | None,
    progress: bool,
    save_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """PPL, parameter counts, saved size, throughput and greedy generations of one model."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len=settings.seq_len, batch_size=1, progress=progress)
    seconds["eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok_s = throughput(model, seq_len=settings.seq_len, batch_size=1, repeats=settings.throughput_repeats)
    seconds["throughput"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    generations = (
        generate_greedy(model, tokenizer, list(settings.prompts), max_new_tokens=settings.max_new_tokens)
        if settings.prompts
        else []
    )
    seconds["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    size, folder = measure_size(model, tokenizer, save_to, save_report)
    seconds["save"] = time.perf_counter() - t0
    counts = count_parameters(model)
    costs = per_token_costs(model, settings.flops_seq_len)
    return {
        "params": int(counts["total"]),
        "params_layers": int(counts["decoder_layers"]),
        "param_counts": counts,
        "kv_cache_bytes_per_token": costs["kv_cache_bytes"],
        "flops_per_token": costs["flops"],
        "flops_seq_len": costs["seq_len"],
        **{k: ppl[k] for k in ("ppl", "nll", "tokens", "predicted_tokens", "windows", "seq_len")},
        "size_bytes": int(size),
        "model_dir": folder,
        "tokens_per_s": float(tok_s),
        "device": _device_name(model),
        "generations": list(generations),
        "layers": layer_table(model),
        "seconds": seconds,
    }


def compute_layer_importance(model: torch.nn.Module, calib_ids: torch.Tensor, key: str, settings: CompareSettings,
                             progress: bool, refit_ids: torch.Tensor | None = None) -> Any:
    """The layer importance ``key`` (of :data:`LAYER_IMPORTANCE_FOR`) that `prune` computes for the run that
    uses it, through the same code path (:func:`layerprune.pruning.pipeline.measure_layer_importance`), on a
    copy of the dense model."""
    run_method = next(m for m, li in LAYER_IMPORTANCE_FOR.items() if li == key)
    config = prune_config(run_method, 0.5, settings, len(decoder_layers(model)))
    pipeline.seed_everything(settings.seed)
    work = copy.deepcopy(model).eval()
    start = time.perf_counter()
    li = pipeline.measure_layer_importance(work, calib_ids, config, progress=progress, refit_ids=refit_ids)
    li.seconds = time.perf_counter() - start  # includes the element scores the curves need
    return li


def _pct_line(run: Mapping[str, Any]) -> str:
    if run["method"] == "dense":
        return f"dense: PPL {run['ppl']:.3f}, {run['params']:,} params"
    return (f"{run['method']} @ {run['target_ratio']:g}: PPL {run['ppl']:.3f}, actual ratio "
            f"{run['actual_ratio']:.4f} ({run['params']:,} params)")


def compare(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: CompareSettings,
    out_dir: str | os.PathLike[str],
    *,
    model_name: str = "model",
    eval_ids: torch.Tensor | None = None,
    calib_ids: torch.Tensor | None = None,
    command: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every method at every ratio, then write report.json, report.md and the plots.

    ``eval_ids`` (1-D test tokens) and ``calib_ids`` ([n, seq_len] calibration tokens) default to the
    evaluated text (``settings.dataset``: WikiText-2 test, or a .txt file) and the calibration text
    (``settings.calib_dataset``); a run that would calibrate on the text it evaluates is refused.
    Returns the report object.
    """
    settings = validate_settings(settings)
    log = log or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    num_layers = len(decoder_layers(model))
    eval_source: dict[str, Any] | str = "token ids given to compare()"
    calib_source: dict[str, Any] | str = "token ids given to compare()"
    if eval_ids is None:
        eval_source = text_source(settings.dataset, None if is_text_file_dataset(settings.dataset) else "test",
                                  settings.data_dir)
    if calib_ids is None:
        calib_source = calibration_source(settings.calib_dataset, settings.data_dir)
    if isinstance(eval_source, dict) and isinstance(calib_source, dict):
        check_disjoint(calib_source, eval_source)
    if eval_ids is None:
        eval_ids = eval_tokens(tokenizer, settings.dataset, settings.data_dir, "test", settings.max_tokens)
    elif settings.max_tokens is not None:
        eval_ids = eval_ids[: settings.max_tokens]
    if calib_ids is None:
        calib_ids = calibration_batch(tokenizer, settings.calib_samples, settings.calib_seq_len, settings.seed,
                                      settings.calib_dataset, settings.data_dir)
    refit_ids = None
    if any(m in REFIT_METHODS for m in settings.methods):  # the refit's own, larger batch (drawn once)
        refit_ids = calibration_batch(tokenizer, settings.refit_samples, settings.refit_seq_len, settings.seed + 1,
                                      settings.calib_dataset, settings.data_dir)
    store = RunStore(out, fingerprint(model, model_name, eval_ids, calib_ids, settings, refit_ids), log,
                     fresh=settings.fresh)

    runs: list[dict[str, Any]] = []
    dense = store.load_run("dense", None, None)
    if dense is not None:
        log("reusing " + _pct_line(dense))
    else:
        log("evaluating the dense model")
        dense = {"method": "dense", "target_ratio": 0.0, "config": None,
                 **measure_model(model, tokenizer, eval_ids, settings, save_to=None, progress=progress)}
        dense.update(actual_ratio=0.0, actual_ratio_layers=0.0, actual_kv_cache_ratio=0.0, actual_flops_ratio=0.0)
        store.save_run(dense)
        log(_pct_line(dense))
    runs.append(dense)

    importances: dict[str, Any] = {}

    def importance_for(key: str) -> Any:
        if key not in importances:
            li = store.load_importance(key)
            if li is None:
                log(f"computing layer importance: {key}")
                li = compute_layer_importance(model, calib_ids, key, settings, progress, refit_ids)
                store.save_importance(key, li)
            importances[key] = li
        return importances[key]

    for method in settings.methods:  # reload cached importance for the report even when every run is reused
        key = LAYER_IMPORTANCE_FOR.get(method)
        if key is not None and store.importance_path(key).is_file():
            li = store.load_importance(key)
            if li is not None:
                importances[key] = li

    for ratio in settings.ratios:
        for method in settings.methods:
            if method == "dense":
                continue
            config = prune_config(method, ratio, settings, num_layers)
            range_rate = None
            if method == "uniform-range":
                range_rate, _ = range_rate_for_ratio(model, ratio, settings)
                config = prune_config(method, range_rate, settings, num_layers)
            elif method == "unbalanced-seed":
                requested, _ = seed_ratio_for_ratio(model, ratio, settings, importance_for("removal"))
                config = prune_config(method, requested, settings, num_layers)
            run = store.load_run(method, ratio, config.to_json())
            if run is not None:
                log("reusing " + _pct_line(run))
                runs.append(run)
                continue
            log(f"{method} @ {ratio:g}: pruning")
            li_method = LAYER_IMPORTANCE_FOR.get(method)
            li = importance_for(li_method) if li_method else None
            t0 = time.perf_counter()
            result = pipeline.prune(model, tokenizer, config, layer_importance=li, calib_ids=calib_ids,
                                    calib_source=calib_source if isinstance(calib_source, dict) else None,
                                    refit_ids=refit_ids if config.refit != "none" else None, progress=progress)
            prune_seconds = time.perf_counter() - t0
            timings = result.report.get("timings", {})
            save_to = model_dir(out, method, ratio) if settings.save_models else None
            measured = measure_model(result.model, tokenizer, eval_ids, settings, save_to=save_to, progress=progress,
                                     save_report=result.report)
            seconds = {
                "layer_importance": float(li.seconds) if li is not None else 0.0,
                "scoring": float(timings.get("element_scores", 0.0)),
                "allocation": float(timings.get("allocation", 0.0)),
                "pruning": float(timings.get("pruning", 0.0)),
                "prune_total": prune_seconds,
                **measured.pop("seconds"),
            }
            layers = measured.pop("layers")
            for entry, dense_layer in zip(layers, dense["layers"]):
                entry["attn_rate"] = 1.0 - entry["kv_groups_kept"] / dense_layer["kv_groups_kept"]
                entry["mlp_rate"] = 1.0 - entry["mlp_kept"] / dense_layer["mlp_kept"]
            alloc = result.allocation
            run = {
                "method": method,
                "target_ratio": ratio,
                "actual_ratio": 1.0 - measured["params"] / dense["params"],
                "actual_ratio_layers": 1.0 - measured["params_layers"] / dense["params_layers"],
                "actual_kv_cache_ratio": 1.0 - measured["kv_cache_bytes_per_token"] / dense["kv_cache_bytes_per_token"],
                "actual_flops_ratio": 1.0 - measured["flops_per_token"] / dense["flops_per_token"],
                **measured,
                "layers": layers,
                "seconds": seconds,
                "config": config.to_json(),
                "range_rate": range_rate,
                "allocation_params_after": int(getattr(alloc, "params_after", measured["params"])),
                "allocation_granule": getattr(alloc, "granule", None),
            }
            fault_point("compare-run")  # before a finished run is stored ...
            store.save_run(run)
            fault_point("compare-stored")  # ... and after
            runs.append(run)
            log(_pct_line(run))
            del result

    report = build_report(runs, settings, model, model_name, importances, {"calibration": calib_source,
                          "evaluation": eval_source}, command)
    report["plots"] = write_plots(out, runs, importances)
    report_mod.write_report(out, report)
    return report


def param_match(runs: Sequence[Mapping[str, Any]], model_granule: int) -> list[dict[str, Any]]:
    """`uniform` vs `unbalanced` parameter counts at each ratio (both target the same budget). The
    granule is the allocation's own (its stated precision) when recorded, else one KV group."""
    out = []
    for ratio in report_mod.target_ratios(runs):
        at = {r["method"]: r for r in runs if r["method"] != "dense" and math.isclose(r["target_ratio"], ratio)}
        if "uniform" in at and "unbalanced" in at:
            a, b = at["uniform"]["params"], at["unbalanced"]["params"]
            recorded = [at[m].get("allocation_granule") for m in ("uniform", "unbalanced")]
            granules = [g for g in recorded if isinstance(g, int) and g > 0]
            granule = max(granules) if len(granules) == len(recorded) else model_granule
            out.append({"target_ratio": ratio, "a": "uniform", "b": "unbalanced", "params_a": a, "params_b": b,
                        "difference": b - a, "granule": granule, "within_granule": abs(b - a) <= granule})
    return out


def build_report(runs: list[dict[str, Any]], settings: CompareSettings, model: torch.nn.Module, model_name: str,
                 importances: Mapping[str, Any], texts: Mapping[str, Any], command: Sequence[str] | None) -> dict[str, Any]:
    """``texts``: exactly which text calibrated (``calibration``) and which was evaluated (``evaluation``)."""
    settings_json = dataclasses.asdict(settings)
    settings_json.update(ratios=list(settings.ratios), methods=list(settings.methods), prompts=list(settings.prompts),
                         texts=dict(texts), device=runs[0].get("device"),
                         reference_range=list(reference_range(len(decoder_layers(model)))))
    return {
        "schema": report_mod.SCHEMA,
        "model": model_name,
        "command": list(command) if command is not None else command_line(),
        "versions": versions(),
        "settings": settings_json,
        "methods": list(settings.methods),
        "method_notes": {m: METHOD_NOTES[m] for m in settings.methods},
        "runs": report_mod.sorted_runs(runs, settings.methods),
        "verdicts": report_mod.verdicts(runs),
        "param_match": param_match(runs, granule_params(model, settings.mlp_step)),
        "layer_importance": {name: li.to_json() for name, li in importances.items()},
        "prompts": list(settings.prompts),
    }


def write_plots(out: Path, runs: Sequence[Mapping[str, Any]], importances: Mapping[str, Any]) -> list[str]:
    """PNG files relative to `out`: importance, allocation per ratio, PPL vs ratio (2+ ratios)."""
    written = []
    if importances:
        plots.plot_importance({n: li.to_json() for n, li in importances.items()}, out / "importance.png")
        written.append("importance.png")
    dense = [r for r in runs if r["method"] == "dense"]
    ratios = report_mod.target_ratios(runs)
    for ratio in ratios:
        at = [r for r in runs if r["method"] != "dense" and math.isclose(r["target_ratio"], ratio)]
        name = f"allocation_{ratio_key(ratio)}.png"
        plots.plot_allocation(dense + at, out / name, title=f"kept widths per layer, target ratio {ratio:g}")
        written.append(name)
    if len(ratios) >= 2:
        plots.plot_ppl_vs_ratio(runs, out / "ppl_vs_ratio.png")
        written.append("ppl_vs_ratio.png")
    return written
