"""`layerprune compare`: prune one model with every method at every ratio, evaluate all on the same
test tokens, and write DIR/report.md, DIR/report.json and PNG plots (finished runs are reused)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from layerprune.cli.args import (add_budget_arguments, add_model_argument, add_runtime_arguments, apply_threads, check_device,
                                 check_outside_inputs, hold_output)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from layerprune.compare import DEFAULT_MAX_TOKENS, METHODS, CompareSettings
    from layerprune.compare.settings import DEFAULT_METHODS

    default = {f.name: f.default for f in dataclasses.fields(CompareSettings)}  # the library's (PruneConfig's)

    p = subparsers.add_parser(
        "compare",
        help="every method (uniform, FLAP, SlimGPT, unbalanced, ...) at equal size on the same tokens, with a report",
        description="Prune --model at each target ratio with every method of --methods (" + ", ".join(METHODS)
        + "; dense is the unpruned model, unbalanced the default of `layerprune prune`), evaluate each on the same "
        "WikiText-2 test tokens (or --dataset), and write DIR/report.md, DIR/report.json and plots. Runs already "
        "finished in DIR are reused. What each method is: docs/methods.md.",
    )
    add_model_argument(p)
    p.add_argument("--ratio", type=float, default=None, help="fraction of ALL parameters to remove, in (0, 1)")
    p.add_argument("--ratios", default=None, help="comma-separated target ratios, e.g. 0.2,0.25 (with or instead of --ratio)")
    add_budget_arguments(p)
    p.add_argument("--out", required=True, help="output folder (created; finished runs in it are reused)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all but unbalanced-search, which "
                   "takes minutes per run; dense is always run)")
    p.add_argument("--search-generations", type=int, default=default["search_generations"],
                   help=f"unbalanced-search: generations of the search (default: {default['search_generations']})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"evaluate the first N test tokens (default: {DEFAULT_MAX_TOKENS}; 0 = the whole split)")
    p.add_argument("--seq-len", type=int, default=default["seq_len"],
                   help=f"evaluation window in tokens (default: {default['seq_len']})")
    p.add_argument("--dataset", default="wikitext2",
                   help="evaluated text: 'wikitext2' (its test split) or a path to a .txt file (default: wikitext2)")
    p.add_argument("--calib-dataset", default="wikitext2",
                   help="calibration text: 'wikitext2' (its train, else valid split) or a .txt file; never the "
                   "evaluated text (default: wikitext2)")
    p.add_argument("--fresh", action="store_true", help="recompute every run and layer importance stored in --out")
    p.add_argument("--data-dir", default=None, help="folder with WikiText-2 raw test.txt / valid.txt")
    p.add_argument("--seed", type=int, default=default["seed"],
                   help=f"seed of the calibration sample (default: {default['seed']})")
    p.add_argument("--calib-samples", type=int, default=default["calib_samples"],
                   help=f"calibration windows (default: {default['calib_samples']})")
    p.add_argument("--calib-seq-len", type=int, default=default["calib_seq_len"],
                   help=f"tokens per calibration window (default: {default['calib_seq_len']})")
    p.add_argument("--max-new-tokens", type=int, default=default["max_new_tokens"],
                   help=f"greedy tokens per prompt (default: {default['max_new_tokens']})")
    p.add_argument("--no-generate", action="store_true", help="skip the greedy generations")
    p.add_argument("--no-save-models", action="store_true",
                   help="do not keep DIR/models/<ratio>/<method> (sizes are still measured through a temporary save)")
    add_runtime_arguments(p)
    p.set_defaults(run=run)
    return p


def settings_from_args(args: argparse.Namespace) -> Any:
    """Checked settings (raises InvalidInputError naming the flag) before any model is loaded."""
    from layerprune.compare import CompareSettings, parse_methods, parse_ratios, validate_settings
    from layerprune.errors import InvalidInputError

    parts: list[float] = []
    if args.ratio is not None:
        parts.append(args.ratio)
    if args.ratios is not None:
        parts.extend(parse_ratios(args.ratios))
    if not parts:
        raise InvalidInputError("give --ratio R or --ratios R1,R2,...")
    if len({round(r, 6) for r in parts}) != len(parts):
        parts = sorted({round(r, 6) for r in parts})  # --ratio repeated inside --ratios: once
    if args.max_tokens is not None and args.max_tokens < 0:
        raise InvalidInputError(f"--max-tokens must be positive (or 0 for the whole split); got {args.max_tokens}")
    settings = CompareSettings(
        ratios=parse_ratios(parts),
        methods=parse_methods(args.methods),
        max_tokens=None if not args.max_tokens else args.max_tokens,
        seq_len=args.seq_len,
        dataset=args.dataset,
        calib_dataset=args.calib_dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len,
        prompts=() if args.no_generate else CompareSettings.prompts,
        max_new_tokens=args.max_new_tokens,
        save_models=not args.no_save_models,
        fresh=args.fresh,
        kv_cache_ratio=args.kv_cache_ratio,
        flops_ratio=args.flops_ratio,
        flops_seq_len=args.flops_seq_len,
        search_generations=args.search_generations,
    )
    if settings.seed < 0:
        raise InvalidInputError(f"--seed must be non-negative; got {settings.seed}")
    return validate_settings(settings)


def run(args: argparse.Namespace) -> int:
    import torch

    from layerprune import models
    from layerprune.compare import compare
    from layerprune.report import main_table

    from layerprune.data import calibration_source, check_disjoint, is_text_file_dataset, text_source

    settings = settings_from_args(args)
    check_outside_inputs(args.out, args.model)
    hold_output(args.out)  # one compare writes --out at a time (a second would race on its runs)
    # before any model is loaded: both texts exist, and calibration never reads the evaluated text
    evaluated = text_source(settings.dataset, None if is_text_file_dataset(settings.dataset) else "test",
                            settings.data_dir)
    check_disjoint(calibration_source(settings.calib_dataset, settings.data_dir), evaluated)
    check_device(args.device)
    apply_threads(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = models.load_model(args.model, dtype=getattr(torch, args.dtype), device=device)

    def log(message: str) -> None:
        print(f"[compare] {message}", file=sys.stderr, flush=True)

    report = compare(model, tokenizer, settings, args.out, model_name=args.model, progress=not args.no_progress,
                     log=log)
    print(main_table(report["runs"], report["methods"]))
    from layerprune.report import verdict_lines

    for line in verdict_lines(report["verdicts"]):
        print(line.replace("**", ""))
    print(f"report: {args.out}/report.md")
    return 0
