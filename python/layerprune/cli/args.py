"""Arguments shared by the `layerprune` subcommands (declared once, checked once)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from layerprune.errors import InvalidInputError

DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = "'smollm2-135m' (embedded), 'gemma3-270m' (shipped), a local Hugging Face folder, or a hub id"


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """--kv-cache-ratio, --flops-ratio and --flops-seq-len: budgets beside --ratio (lower bounds)."""
    p.add_argument("--kv-cache-ratio", type=float, default=None,
                   help="also remove at least this fraction of the KV-cache bytes per token, in (0, 1)")
    p.add_argument("--flops-ratio", type=float, default=None,
                   help="also remove at least this fraction of the FLOPs per token, in (0, 1)")
    from layerprune.pruning.config import PruneConfig

    default = PruneConfig.__dataclass_fields__["flops_seq_len"].default
    p.add_argument("--flops-seq-len", type=int, default=default,
                   help=f"positions a token attends to in the FLOPs count (default: {default})")


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


def check_device(device: str | None) -> None:
    """--device names a torch device this machine has: one error line (exit 2) instead of torch's traceback when
    it is not a device, or when it is CUDA and no CUDA device (or not that many) is visible."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"--device {device} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {device}: no CUDA device is visible (torch.cuda.is_available() is False)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """A byte count: ``123``, ``1.5GB`` (powers of 1000), ``24GiB`` or ``24G`` (powers of 1024)."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 24GB, 512MiB or 1000000, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


_held_outputs = contextlib.ExitStack()  # the outputs this command claimed (released when it ends)


def hold_output(out: str | os.PathLike[str]) -> None:
    """Claim ``out`` until the command ends (:func:`layerprune.atomic.claim_output`): a second command writing
    the same path is refused in one line. Nothing is claimed where the parent folder does not exist."""
    from layerprune.atomic import claim_output

    path = Path(out).expanduser()
    if path.absolute().parent.is_dir():
        _held_outputs.enter_context(claim_output(path))


def release_outputs() -> None:
    _held_outputs.close()


def check_outside_inputs(out: str, *models: str) -> None:
    """--out is not an input model's folder nor inside one: inputs are never modified."""
    path = Path(out).expanduser().resolve()
    for model in models:
        source = Path(model).expanduser()
        if source.is_dir() and (path == source.resolve() or path.is_relative_to(source.resolve())):
            raise InvalidInputError(f"--out {out} is inside the input model's folder {model}: inputs are never "
                                    "modified; write the output elsewhere")


def check_out(out: str, overwrite: bool, *models: str) -> None:
    """--out is a writable place for a new folder, outside every input model's folder (inputs are never
    modified), and empty unless --overwrite; it is claimed for this command (:func:`hold_output`) before its
    contents are checked, so two commands writing one --out never both pass."""
    path = Path(out).expanduser()
    check_outside_inputs(out, *models)
    parent = path.absolute().parent
    if not parent.is_dir():
        raise InvalidInputError(f"--out {out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InvalidInputError(f"--out {out}: parent folder {parent} is not writable")
    hold_output(path)
    if path.exists():
        if not path.is_dir():
            raise InvalidInputError(f"--out {out} exists and is not a folder")
        if any(path.iterdir()) and not overwrite:
            raise InvalidInputError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
