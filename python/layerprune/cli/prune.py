"""`layerprune prune`: structurally prune a Llama model (uniform or unbalanced) and save it."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from layerprune.cli.args import add_model_argument, add_runtime_arguments, apply_threads
from layerprune.errors import InvalidInputError


def _protected(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from layerprune.scoring.groups import IMPORTANCE_KINDS
    from layerprune.importance import METHODS
    from layerprune.pruning.pipeline import MODES, SOLVERS
    from layerprune.pruning.refit import REFIT_MODES
    from layerprune.refit import DEFAULT_DAMPING

    p = subparsers.add_parser(
        "prune",
        help="prune KV groups and MLP channels to a parameter budget and save the model",
        description="Remove whole KV groups (with their query heads) and MLP channels from a Llama model so that "
        "--ratio of ALL parameters is removed: the same rate in every layer (--mode uniform, LLM-Pruner style) "
        "or per-layer rates from layer importance (--mode unbalanced). Writes a loadable folder with report.json.",
    )
    add_model_argument(p)
    p.add_argument("--ratio", type=float, required=True, help="fraction of all parameters to remove, in (0, 1)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--mode", choices=MODES, default="unbalanced", help="uniform or unbalanced (default: unbalanced)")
    p.add_argument("--solver", choices=SOLVERS, default="dp", help="allocation solver for unbalanced (default: dp)")
    p.add_argument("--layer-importance", choices=METHODS, default="removal",
                   help="layer importance for unbalanced (default: removal)")
    p.add_argument("--removal-metric", choices=("loss", "ppl"), default="loss",
                   help="removal importance measures the calibration loss increase (default) or the perplexity increase")
    p.add_argument("--importance", choices=IMPORTANCE_KINDS, default="taylor",
                   help="element score choosing which heads/channels to keep (default: taylor)")
    p.add_argument("--match-params", action="store_true",
                   help="uniform: one rate chosen to remove exactly --ratio of ALL parameters (else --ratio is the "
                   "per-layer rate, LLM-Pruner style)")
    p.add_argument("--calib-samples", type=int, default=10, help="calibration windows (default: 10)")
    p.add_argument("--calib-seq-len", type=int, default=64, help="tokens per calibration window (default: 64)")
    p.add_argument("--curve-samples", type=int, default=None,
                   help="sensitivity: measure the curves on the first N calibration windows (default: all)")
    p.add_argument("--iterative-steps", type=int, default=1, help="prune in N steps, rescoring between (default: 1)")
    for name, what in (("layer", "attention and MLP"), ("attn-layer", "attention"), ("mlp-layer", "MLP")):
        p.add_argument(f"--{name}-start", type=int, default=None, help=f"first prunable layer for {what} (default: 0)")
        p.add_argument(f"--{name}-end", type=int, default=None, help=f"end (exclusive) of the {what} range (default: all)")
    p.add_argument("--min-effective-rate", type=float, default=0.0,
                   help="seed solver: per-layer rates below this become 0 (default: 0)")
    p.add_argument("--protected", type=_protected, default=(), help="comma-separated layers never pruned")
    p.add_argument("--mlp-step", type=int, default=1, help="MLP channels are kept in multiples of this (default: 1)")
    p.add_argument("--min-kv-groups", type=int, default=1, help="KV groups every layer keeps at least (default: 1)")
    p.add_argument("--tie", action="store_true", help="one rate for attention and MLP in each layer")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    p.add_argument("--refit", choices=REFIT_MODES, default="none",
                   help="refit the kept o_proj / down_proj columns by least squares on calibration activations "
                   "(lstsq), with a compensation bias (lstsq-bias), or the bias alone (bias, FLAP)")
    p.add_argument("--refit-damping", type=float, default=DEFAULT_DAMPING,
                   help=f"refit damping, a fraction of the Gram matrix's mean diagonal (default: {DEFAULT_DAMPING})")
    p.add_argument("--no-error-correction", action="store_true",
                   help="refit every layer on the dense model's inputs instead of the refit layers' outputs")
    p.add_argument("--refit-samples", type=int, default=32, help="calibration windows of the refit (default: 32)")
    p.add_argument("--refit-seq-len", type=int, default=256, help="tokens per refit window (default: 256)")
    p.add_argument("--calib-dataset", "--dataset", dest="calib_dataset", default="wikitext2",
                   help="calibration text: 'wikitext2' (its train, else valid split; never test) or a .txt file")
    p.add_argument("--data-dir", default=None, help="folder with WikiText-2 raw valid.txt (calibration; never test.txt)")
    add_runtime_arguments(p, device=False)
    p.set_defaults(run=run)
    return p


def config_from_args(args: argparse.Namespace):
    from layerprune.pruning.pipeline import PruneConfig

    return PruneConfig(
        ratio=args.ratio, mode=args.mode, solver=args.solver, layer_importance=args.layer_importance,
        removal_metric=args.removal_metric,
        importance=args.importance, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
        iterative_steps=args.iterative_steps, match_params=args.match_params, layer_start=args.layer_start,
        layer_end=args.layer_end, attn_layer_start=args.attn_layer_start, attn_layer_end=args.attn_layer_end,
        mlp_layer_start=args.mlp_layer_start, mlp_layer_end=args.mlp_layer_end,
        min_effective_rate=args.min_effective_rate, protected=tuple(args.protected), mlp_step=args.mlp_step,
        min_kv_groups=args.min_kv_groups, tie=args.tie, seed=args.seed, calib_dataset=args.calib_dataset, data_dir=args.data_dir,
        curve_samples=args.curve_samples, refit=args.refit, refit_damping=args.refit_damping,
        refit_error_correction=not args.no_error_correction, refit_samples=args.refit_samples,
        refit_seq_len=args.refit_seq_len,
    )


def _check_out(out: str, overwrite: bool) -> None:
    path = Path(out).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidInputError(f"--out {out} exists and is not a folder")
        if any(path.iterdir()) and not overwrite:
            raise InvalidInputError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InvalidInputError(f"--out {out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"--out {out}: parent folder {parent} is not writable")


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


def run(args: argparse.Namespace) -> int:
    import torch

    from layerprune.data import calibration_source
    from layerprune.models import check_supported, load_config
    from layerprune.pruning import pipeline
    from layerprune.pruning.pipeline import check_feasible, summary_table, validate_against_model, validate_config
    from layerprune.export import save_pruned

    progress = not args.no_progress
    start = time.perf_counter()
    # Everything that can be checked without the weights is checked first.
    config = config_from_args(args)
    validate_config(config)
    apply_threads(args)
    _check_out(args.out, args.overwrite)
    calibration_source(config.calib_dataset, config.data_dir)  # the calibration text exists and is readable
    model_config = load_config(args.model)
    check_supported(model_config, f"model '{args.model}'")
    layers = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise InvalidInputError(f"model '{args.model}': its config has no num_hidden_layers")
    validate_against_model(config, layers, getattr(model_config, "num_key_value_heads", None))
    check_feasible(model_config, config)

    t0 = time.perf_counter()
    model, tokenizer = _load_quietly(args.model, getattr(torch, args.dtype), progress)
    load_seconds = time.perf_counter() - t0
    result = pipeline.prune(model, tokenizer, config, progress=progress)
    report = result.report
    report["model"] = os.fspath(args.model)
    report["timings"] = {"load": round(load_seconds, 3), **report["timings"]}
    t0 = time.perf_counter()
    out = save_pruned(result.model, tokenizer, args.out, report=report, overwrite=args.overwrite)
    save_seconds = time.perf_counter() - t0
    wall = time.perf_counter() - start
    print(summary_table(report, extra=[("time: save", f"{save_seconds:.1f} s"), ("time: wall", f"{wall:.1f} s"),
                                       ("saved to", str(out))]))
    return 0
