"""`layerprune prune`: structurally prune a Llama model (uniform or unbalanced) and save it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from layerprune.cli.args import (
    add_budget_arguments,
    add_model_argument,
    add_runtime_arguments,
    apply_threads,
    check_device,
    check_out,
    parse_size,
)
from layerprune.errors import InvalidInputError


def _protected(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from layerprune.cli.torchrun import add_distributed_arguments
    from layerprune.importance import METHODS
    from layerprune.pruning.config import (ALLOCATIONS, DEFAULT_METHOD, FALLBACK_METHOD, IMPORTANCES, MODES, SOLVERS,
                                           PruneConfig)
    from layerprune.refit import REFIT_MODES

    default = {f.name: f.default for f in dataclasses.fields(PruneConfig)}  # every default is the library's

    p = subparsers.add_parser(
        "prune",
        help="prune KV groups and MLP channels to a parameter budget and save the model",
        description="Remove whole KV groups (with their query heads) and MLP channels from a Llama model so that "
        "--ratio of ALL parameters is removed: the same rate in every layer (--mode uniform, LLM-Pruner style) "
        "or per-layer rates from layer importance (--mode unbalanced). Writes a loadable folder with report.json.",
    )
    add_model_argument(p)
    p.add_argument("--ratio", type=float, required=True, help="fraction of all parameters to remove, in (0, 1)")
    add_budget_arguments(p)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--mode", choices=MODES, default=default["mode"],
                   help=f"uniform, unbalanced or flap (default: {default['mode']})")
    p.add_argument("--solver", choices=SOLVERS, default=default["solver"],
                   help=f"allocation solver for unbalanced (default: {default['solver']})")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=default["allocation"],
                   help="solve: the solver's widths; search: an evolutionary search from them, each candidate scored by "
                   "the KL of the whole pruned model from the dense one on held-out calibration windows (EvoPress, Týr) "
                   f"(default: {default['allocation']})")
    p.add_argument("--search-generations", type=int, default=default["search_generations"],
                   help=f"--allocation search: the most generations (default: {default['search_generations']})")
    p.add_argument("--search-time", type=float, default=None,
                   help="--allocation search: seconds after which no new generation starts (default: no limit)")
    p.add_argument("--search-offspring", type=int, default=default["search_offspring"],
                   help=f"--allocation search: candidates per generation (default: {default['search_offspring']})")
    p.add_argument("--search-samples", type=int, default=default["search_samples"],
                   help="--allocation search: held-out windows of --refit-seq-len tokens the fitness is measured on "
                   f"(default: {default['search_samples']})")
    p.add_argument("--layer-importance", choices=METHODS, default=None,
                   help=f"layer importance for unbalanced (default: {DEFAULT_METHOD['layer_importance']}, the best "
                   f"measured, where the run can take it, else {FALLBACK_METHOD['layer_importance']}; docs/methods.md)")
    p.add_argument("--removal-metric", choices=("loss", "ppl"), default=default["removal_metric"],
                   help="removal importance measures the calibration loss increase (default) or the perplexity increase")
    p.add_argument("--importance", choices=IMPORTANCES, default=None,
                   help="what chooses the heads/channels kept: an element score, or obs (structured OBS on the refit's "
                   "Gram matrices: the least error after the refit, SlimGPT; needs --refit lstsq) (default: "
                   f"{DEFAULT_METHOD['importance']} where the run can take it, i.e. --refit lstsq, mode unbalanced or "
                   f"uniform, one step; else {FALLBACK_METHOD['importance']})")
    p.add_argument("--match-params", action="store_true",
                   help="uniform: one rate chosen to remove exactly --ratio of ALL parameters (else --ratio is the "
                   "per-layer rate, LLM-Pruner style)")
    p.add_argument("--calib-samples", type=int, default=default["calib_samples"],
                   help=f"calibration windows (default: {default['calib_samples']})")
    p.add_argument("--calib-seq-len", type=int, default=default["calib_seq_len"],
                   help=f"tokens per calibration window (default: {default['calib_seq_len']})")
    p.add_argument("--curve-samples", type=int, default=None,
                   help="measure the curves on the first N windows: sensitivity of the calibration batch, "
                   "reconstruction of the refit batch (default: all)")
    p.add_argument("--iterative-steps", type=int, default=default["iterative_steps"],
                   help=f"prune in N steps, rescoring between (default: {default['iterative_steps']})")
    for name, what in (("layer", "attention and MLP"), ("attn-layer", "attention"), ("mlp-layer", "MLP")):
        p.add_argument(f"--{name}-start", type=int, default=None, help=f"first prunable layer for {what} (default: 0)")
        p.add_argument(f"--{name}-end", type=int, default=None, help=f"end (exclusive) of the {what} range (default: all)")
    p.add_argument("--min-effective-rate", type=float, default=default["min_effective_rate"],
                   help=f"seed solver: per-layer rates below this become 0 (default: {default['min_effective_rate']:g})")
    p.add_argument("--protected", type=_protected, default=(), help="comma-separated layers never pruned")
    p.add_argument("--mlp-step", type=int, default=default["mlp_step"],
                   help=f"MLP channels are kept in multiples of this (default: {default['mlp_step']})")
    p.add_argument("--min-kv-groups", type=int, default=default["min_kv_groups"],
                   help=f"KV groups every layer keeps at least; 0 lets a layer lose its attention (default: "
                        f"{default['min_kv_groups']})")
    p.add_argument("--min-mlp-channels", type=int, default=default["min_mlp_channels"],
                   help=f"MLP channels every layer keeps at least; 0 lets a layer lose its MLP (default: "
                        f"{default['min_mlp_channels']})")
    p.add_argument("--tie", action="store_true", help="one rate for attention and MLP in each layer")
    p.add_argument("--homogeneous", action="store_true",
                   help="the same KV groups and MLP channels in every layer, at the exact budget (to one step per "
                   "layer), so the model saves under the family's own config (no remote code): with --mode unbalanced "
                   "the best equal widths by the layer importance, with --mode uniform --match-params flat")
    p.add_argument("--seed", type=int, default=default["seed"], help=f"seed for every random choice (default: {default['seed']})")
    p.add_argument("--refit", choices=REFIT_MODES, default=default["refit"],
                   help="refit the kept o_proj / down_proj columns by least squares on calibration activations "
                   "(lstsq), with a compensation bias (lstsq-bias), or the bias alone (bias, FLAP); none keeps them "
                   f"as they are (default: {default['refit']})")
    p.add_argument("--refit-damping", type=float, default=default["refit_damping"],
                   help=f"refit damping, a fraction of the Gram matrix's mean diagonal (default: {default['refit_damping']})")
    p.add_argument("--no-error-correction", action="store_true",
                   help="refit every layer on the dense model's inputs instead of the refit layers' outputs")
    p.add_argument("--refit-samples", type=int, default=default["refit_samples"],
                   help=f"calibration windows of the refit (default: {default['refit_samples']})")
    p.add_argument("--refit-seq-len", type=int, default=default["refit_seq_len"],
                   help=f"tokens per refit window (default: {default['refit_seq_len']})")
    p.add_argument("--fisher-samples", type=int, default=default["fisher_samples"],
                   help=f"reconstruction curves: the Fisher from the first n refit windows (default: {default['fisher_samples']})")
    p.add_argument("--calib-dataset", "--dataset", dest="calib_dataset", default=default["calib_dataset"],
                   help="calibration text: 'wikitext2' (its train, else valid split; never test) or a .txt file")
    p.add_argument("--data-dir", default=None, help="folder with WikiText-2 raw valid.txt (calibration; never test.txt)")
    add_runtime_arguments(p, device=False)
    add_sequential_arguments(p)
    add_distributed_arguments(p)
    p.set_defaults(run=run)
    return p


def add_sequential_arguments(p: argparse.ArgumentParser) -> None:
    """--device, --sequential, --max-memory, --max-shard-size."""
    g = p.add_argument_group("models larger than memory (layer by layer)")
    g.add_argument("--device", default=None,
                   help="where the model runs (default: cpu); with --sequential one decoder layer at a time is moved "
                   "there, and the calibration hidden states stay there while they fit")
    g.add_argument("--sequential", action="store_true",
                   help="prune layer by layer: one decoder layer's weights in memory at a time, read from the "
                   "checkpoint's safetensors, the calibration hidden states spilled to disk past a budget; "
                   "forward-only importance (obs, activation, l1, l2; layer importance removal, activation or "
                   "sensitivity). Chosen by itself when the weights exceed --max-memory")
    g.add_argument("--max-memory", type=parse_size, default=None,
                   help="memory this run may use, e.g. 24GB (default: the memory available now); heavier weights "
                   "switch to --sequential, which keeps its hidden states within what the layers leave of it "
                   "(default there: of a quarter of the checkpoint) and spills the rest to disk")
    g.add_argument("--max-shard-size", type=parse_size, default=None,
                   help="--sequential: largest safetensors shard written (default: 50GB, as transformers)")


def _run_sequential(args: argparse.Namespace, config: Any, why: str | None, progress: bool, start: float) -> int:
    """`prune --sequential`: the checkpoint pruned layer by layer into --out (layerprune.export.prune_checkpoint)."""
    import torch

    from layerprune import distributed
    from layerprune.export.streamed import DEFAULT_MAX_SHARD_BYTES, prune_checkpoint
    from layerprune.models import load_config, resolve_model
    from layerprune.models.checkpoint import SafetensorsCheckpoint
    from layerprune.pruning.config import resolve_config
    from layerprune.pruning.executor import format_size
    from layerprune.pruning.pipeline import summary_table

    try:
        config = resolve_config(config, "layers")
        if distributed.active() is not None:
            raise InvalidInputError("--sequential prunes in one process; run it without torchrun")
    except InvalidInputError as err:
        if why is None:
            raise
        raise InvalidInputError(f"{why}, so this run must go layer by layer (--sequential), where {err}") from None
    dtype = getattr(torch, args.dtype)
    resolved = resolve_model(args.model)
    if not isinstance(resolved, Path) or not resolved.is_dir():
        raise InvalidInputError(f"--sequential reads a local folder of safetensors, got --model {args.model}")
    model_config = load_config(resolved)
    with SafetensorsCheckpoint(resolved) as checkpoint:  # every shard there, whole, with every tensor
        checkpoint.check_config(model_config)
    if why is not None:
        print(f"layerprune prune: {why}: pruning layer by layer (--sequential)", file=sys.stderr)
    out, result = prune_checkpoint(
        resolved, config, args.out, dtype=dtype, device=args.device or "cpu",
        max_memory=args.max_memory, overwrite=args.overwrite,
        max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES, report_extra={"model": os.fspath(args.model)},
        progress=progress)
    report = result.report
    seq = report["sequential"]
    wall = time.perf_counter() - start
    print(summary_table(report, extra=[
        ("layer by layer", f"{seq['passes']} pass(es) over {format_size(seq['checkpoint_bytes'])}, largest layer "
                           f"{format_size(seq['max_layer_bytes'])}, hidden states spilled "
                           f"{format_size(seq['hidden_states']['spilled_bytes'])}"),
        ("time: wall", f"{wall:.1f} s"), ("saved to", str(out))]))
    return 0


def config_from_args(args: argparse.Namespace):
    """The PruneConfig the flags describe; what they leave open (importance, layer importance) the library fills."""
    from layerprune.pruning.config import PruneConfig

    return PruneConfig(
        ratio=args.ratio, mode=args.mode, solver=args.solver, layer_importance=args.layer_importance,
        removal_metric=args.removal_metric, importance=args.importance, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, iterative_steps=args.iterative_steps, match_params=args.match_params,
        layer_start=args.layer_start, layer_end=args.layer_end, attn_layer_start=args.attn_layer_start,
        attn_layer_end=args.attn_layer_end, mlp_layer_start=args.mlp_layer_start, mlp_layer_end=args.mlp_layer_end,
        min_effective_rate=args.min_effective_rate, protected=tuple(args.protected), mlp_step=args.mlp_step,
        min_kv_groups=args.min_kv_groups, min_mlp_channels=args.min_mlp_channels, tie=args.tie, seed=args.seed,
        calib_dataset=args.calib_dataset,
        data_dir=args.data_dir, homogeneous=args.homogeneous, curve_samples=args.curve_samples, refit=args.refit,
        refit_damping=args.refit_damping, refit_error_correction=not args.no_error_correction,
        refit_samples=args.refit_samples, fisher_samples=args.fisher_samples, refit_seq_len=args.refit_seq_len,
        kv_cache_ratio=args.kv_cache_ratio, flops_ratio=args.flops_ratio, flops_seq_len=args.flops_seq_len,
        fsdp=args.fsdp, allocation=args.allocation, search_generations=args.search_generations,
        search_time=args.search_time, search_offspring=args.search_offspring, search_samples=args.search_samples,
    )


def _load_quietly(name: str, dtype, progress: bool):
    """load_model, with transformers' own progress bars off under --no-progress (restored after)."""
    from transformers.utils import logging as hf_logging

    from layerprune.models import load_model

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        return load_model(name, dtype=dtype)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_shares(config) -> None:
    """Under torchrun every rank needs at least one sample of each calibration batch it computes on."""
    from layerprune import distributed

    distributed.check_shareable(config.calib_samples, "calib_samples")
    if config.refit != "none" or config.mode == "flap":
        distributed.check_shareable(config.refit_samples, "refit_samples")
    if config.curve_samples is not None and config.layer_importance == "sensitivity":
        distributed.check_shareable(min(config.curve_samples, config.calib_samples), "curve_samples")


def run(args: argparse.Namespace) -> int:
    import torch

    from layerprune import distributed
    from layerprune.cli.torchrun import first_on_local_rank0
    from layerprune.data import calibration_source
    from layerprune.models import check_supported, load_config
    from layerprune.pruning import pipeline
    from layerprune.pruning.config import resolve_config, validate_against_model
    from layerprune.pruning.executor import choose_executor
    from layerprune.pruning.pipeline import check_feasible, summary_table
    from layerprune.export import save_pruned
    from layerprune.export.save import WIDTHS_DIFFER, plain_config_obstacle

    progress = not args.no_progress and distributed.is_rank0()  # under torchrun: rank 0's bars only
    start = time.perf_counter()
    # Everything that can be checked without the weights is checked first, once, for the executor asked for.
    config = resolve_config(config_from_args(args), "layers" if args.sequential else "memory")
    apply_threads(args)
    check_device(args.device)
    if distributed.is_rank0():  # rank 0 alone writes (under torchrun the others may not see its --out)
        check_out(args.out, args.overwrite, args.model)
    _check_shares(config)
    calibration_source(config.calib_dataset, config.data_dir)  # the calibration text exists and is readable
    model_config = first_on_local_rank0(load_config, args.model)  # the embedded model is converted once per node
    check_supported(model_config, f"model '{args.model}'")
    layers = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise InvalidInputError(f"model '{args.model}': its config has no num_hidden_layers")
    validate_against_model(config, layers, getattr(model_config, "num_key_value_heads", None))
    check_feasible(model_config, config)
    # the library chooses the executor from the weights' size; --sequential forces layer by layer
    executor, why = choose_executor(args.model, getattr(torch, args.dtype), args.max_memory, args.sequential,
                                    limit_name="--max-memory")
    if executor == "layers":
        # left open, the importance and layer importance are the layer-by-layer executor's defaults
        return _run_sequential(args, config_from_args(args), why, progress, start)

    t0 = time.perf_counter()
    model, tokenizer = _load_quietly(args.model, getattr(torch, args.dtype), progress)
    torch.nn.Module.to(model, args.device or distributed.model_device())  # NCCL: this rank's GPU
    load_seconds = time.perf_counter() - t0
    result = pipeline.prune(model, tokenizer, config, progress=progress, inplace=True)  # this copy is ours
    report = result.report
    report["model"] = os.fspath(args.model)
    report["timings"] = {"load": round(load_seconds, 3), **report["timings"]}
    distributed.barrier("pruned")  # every rank has pruned to the same plan before rank 0 writes
    if not distributed.is_rank0():
        return 0
    t0 = time.perf_counter()
    extra = {}
    if report.get("search"):
        from layerprune.report.plots import plot_search

        extra["search.png"] = lambda path: plot_search(report["search"], path)
    out = save_pruned(result.model, tokenizer, args.out, report=report, overwrite=args.overwrite, extra_files=extra)
    save_seconds = time.perf_counter() - t0
    why = plain_config_obstacle(result.model)
    if why is not None and why != WIDTHS_DIFFER:  # equal widths, yet no plain config: say why
        print(f"layerprune prune: config.json is not the family's own config: {why}; saved with the remote-code "
              "layout (layerprune.load_pruned, or trust_remote_code=True)", file=sys.stderr)
    wall = time.perf_counter() - start
    rows = [("time: save", f"{save_seconds:.1f} s"), ("time: wall", f"{wall:.1f} s"), ("saved to", str(out))]
    if report.get("search"):
        s = report["search"]
        rows.insert(0, ("allocation search", f"KL {s['seed_fitness']:.4f} -> {s['fitness']:.4f} per token, "
                                             f"{s['accepted']} improvements in {s['generations']} generations, "
                                             f"{s['seconds']:.0f} s (search.png)"))
    print(summary_table(report, extra=rows))
    return 0
