"""Arguments shared by the `layerprune` subcommands (declared once, checked once)."""

from __future__ import annotations

import argparse

from layerprune.errors import InvalidInputError

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = "'smollm2-135m' (embedded), a local Hugging Face folder, or a hub id"


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)


def add_runtime_arguments(p: argparse.ArgumentParser, *, device: bool = True, threads: bool = True) -> None:
    """--dtype, --device, --threads and --no-progress."""
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default: float32)")
    if device:
        p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    if threads:
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads of torch and of the Rust kernels (default: every core; 1 is faster on a "
                       "busy machine). Results do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads and the Rust kernels' pool size from --threads (when given).

    The Rust pool starts at its first use, so this must run before any scoring (every command calls it
    before loading a model)."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise InvalidInputError(f"--threads must be >= 1, got {args.threads}")
    import os

    import torch

    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
