"""`layerprune heal`: distil a pruned model from its dense model on calibration text, and save it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from layerprune.cli.args import MODEL_HELP, add_runtime_arguments, apply_threads, check_device, check_out
from layerprune.errors import InvalidInputError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from layerprune.healing import FULL_LR, LORA_LR, PRECISIONS, TEACHER_LOGITS, HealConfig

    d = HealConfig()
    p = subparsers.add_parser(
        "heal",
        help="recover a pruned model's quality by distillation from the dense model",
        description="Train the pruned model (all its weights, or LoRA adapters merged back at save) to match the "
        "dense model's next-token distributions, KL(teacher || student), on calibration text (WikiText-2's "
        "train or valid split, or --data FILE.txt; never the test split). The teacher runs once: its top-K "
        "log-probabilities are cached on disk. Checkpoints are written every few steps; a stopped run continues "
        "with --resume and ends on the same weights.",
    )
    p.add_argument("--model", required=True, help="the student: a pruned folder (or any model: " + MODEL_HELP + ")")
    p.add_argument("--teacher", required=True, help="the dense model it was pruned from: " + MODEL_HELP)
    p.add_argument("--out", required=True, help="folder for the healed model (written whole, or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--resume", action="store_true", help="continue the stopped run whose checkpoint is in the state folder")
    p.add_argument("--state-dir", default=None,
                   help="checkpoints and the teacher cache (default: OUT.heal-state beside --out; removed at the end)")
    p.add_argument("--teacher-cache", default=None,
                   help="a folder for the teacher's top-K cache, kept and shared by later runs on the same teacher and text")
    p.add_argument("--data", default="wikitext2",
                   help="'wikitext2' (its train split, else valid) or a .txt file (default: wikitext2)")
    p.add_argument("--data-dir", default=None,
                   help="folder with WikiText-2 raw valid.txt (default: $LAYERPRUNE_DATA_DIR, else the datasets library)")
    p.add_argument("--tokens", type=int, default=d.tokens, help=f"training tokens (default: {d.tokens})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"sequences per optimizer step, over all ranks (default: {d.batch_size})")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward pass; the rest is gradient accumulation (default: --batch-size)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: {FULL_LR:g}, or {LORA_LR:g} with --lora)")
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help=f"the cosine decays to lr x this (default: {d.min_lr_ratio})")
    p.add_argument("--warmup", type=float, default=d.warmup, help=f"warm-up fraction of the steps (default: {d.warmup})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW's (default: {d.weight_decay})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"gradient clipping (default: {d.max_grad_norm})")
    p.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"softens both distributions; the loss is scaled by T^2 (default: {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help=f"teacher tokens kept per position; at least the vocabulary: the full KL (default: {d.top_k})")
    p.add_argument("--teacher-logits", choices=TEACHER_LOGITS, default=d.teacher_logits,
                   help="cached: the teacher runs once, before training; live: at every step (default: cached)")
    p.add_argument("--ce-weight", type=float, default=d.ce_weight,
                   help=f"weight of the text's cross-entropy added to the KL (default: {d.ce_weight})")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help=f"(default: {d.lora_rank})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help=f"(default: {d.lora_alpha:g})")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help=f"(default: {d.lora_dropout})")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="bfloat16: autocast, with float32 weights and optimizer state (default: float32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass: less memory, more time")
    p.add_argument("--held-out", type=float, default=d.held_out_fraction,
                   help=f"fraction of the text kept aside for validation (default: {d.held_out_fraction})")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (default: ~8 per run)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between checkpoints (default: at every evaluation)")
    p.add_argument("--patience", type=int, default=None,
                   help="stop after this many evaluations without a better held-out loss, keeping the best weights")
    p.add_argument("--seed", type=int, default=d.seed, help=f"data order and adapters (default: {d.seed})")
    add_runtime_arguments(p)
    from layerprune.cli.torchrun import add_distributed_arguments

    add_distributed_arguments(p, fsdp="shard the decoder layers' weights, gradients and AdamW state over the ranks "
                              "with FSDP2 (the embeddings and head stay whole on each); --batch-size must be a "
                              "multiple of the ranks")
    p.set_defaults(run=run)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from layerprune.healing import HealConfig, validate_heal_config

    return validate_heal_config(HealConfig(
        tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, temperature=args.temperature, top_k=args.top_k,
        teacher_logits=args.teacher_logits, ce_weight=args.ce_weight, lora=args.lora, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing, fsdp=args.fsdp, held_out_fraction=args.held_out,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, patience=args.patience, seed=args.seed,
        dataset=args.data, data_dir=args.data_dir))


def _student_report(model: str) -> dict[str, Any]:
    """The student folder's own report.json (a pruned folder's), or {}."""
    path = Path(model).expanduser() / "report.json"
    if not path.is_file():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"--model {model}: unreadable report.json ({err})") from None
    return loaded if isinstance(loaded, dict) else {}


def run(args: argparse.Namespace) -> int:
    import torch

    from layerprune import distributed
    from layerprune.cli.torchrun import first_on_local_rank0
    from layerprune.healing import heal
    from layerprune.healing.text import check_not_evaluated
    from layerprune.data import calibration_source
    from layerprune.models import load_model

    started = time.perf_counter()
    config = config_from_args(args)
    check_device(args.device)
    apply_threads(args)
    if distributed.is_rank0():
        check_out(args.out, args.overwrite, args.model, args.teacher)
    check_not_evaluated(calibration_source(config.dataset, config.data_dir), config.data_dir)
    if config.lora:
        from layerprune.healing.lora import require_peft

        require_peft()  # before any model is loaded
    progress = not args.no_progress and distributed.is_rank0()
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    device = args.device or distributed.model_device()
    student, tokenizer = first_on_local_rank0(load_model, args.model, dtype=dtype, device=device)

    def load_teacher() -> Any:
        return load_model(args.teacher, dtype=dtype, device=device, require_tokenizer=False)[0]

    # cached: rank 0 alone loads the teacher, fills the cache and drops it before training; live: every rank
    teacher = load_teacher if config.teacher_logits == "cached" else first_on_local_rank0(load_teacher)

    def log(message: str) -> None:
        if distributed.is_rank0():
            print(f"[heal] {message}", file=sys.stderr, flush=True)

    result = heal(student, teacher, tokenizer, config, args.out, teacher_cache=args.teacher_cache,
                  state_dir=args.state_dir, resume=args.resume, report=_student_report(args.model),
                  overwrite=args.overwrite, progress=progress, inplace=True, log=log)
    if not distributed.is_rank0():
        return 0
    h = result.report["heal"]
    before, after = h["held_out_before"], h["held_out_after"]
    rate = h["tokens_per_second"]
    print(f"healed {os.fspath(args.model)} from {os.fspath(args.teacher)} on {h['tokens']:,} tokens in "
          f"{h['train_seconds']:.1f} s ({rate:,.0f} tokens/s)" if rate else f"healed on {h['tokens']:,} tokens")
    print(f"held-out: loss {before['loss']:.4f} -> {after['loss']:.4f}, perplexity {before['ppl']:.2f} -> "
          f"{after['ppl']:.2f}" + (f" (stopped early; weights of step {h['best_step']})" if h["stopped_early"] else ""))
    print(f"saved: {result.out} ({time.perf_counter() - started:.1f} s in all)")
    return 0


__all__ = ["add_parser", "config_from_args", "run"]
