"""The `layerprune` command line.

Each subcommand lives in `layerprune/cli/<name>.py` with `add_parser(subparsers)` and `run(args) -> int`;
this module only dispatches and maps errors to one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

SUBCOMMANDS = ("eval", "allocate", "prune", "heal", "compare", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerprune",
        description="Structured pruning of Llama-family language models (Llama, Mistral, Qwen2, Qwen3, Granite): "
        "uniform or unbalanced, under an exact parameter budget.",
        epilog="example: layerprune prune --model smollm2-135m --ratio 0.2 --out pruned/",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"layerprune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"layerprune.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


# Failures of the user's input or environment, not of layerprune: one line, exit 2.
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# A write that found no room: the disk, a quota, or a file-size limit (ulimit -f) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE
REPORT_BUG = "this is a bug in layerprune: please report it with the traceback above"


def failure(command: str, exc: BaseException, where: str = "") -> tuple[int, str]:
    """The exit code and the one line a command that raised ``exc`` ends with (a bug's traceback is printed
    first). ``where`` names the rank under torchrun ("rank 1 of 4")."""
    import traceback

    from layerprune.errors import InternalError, LayerpruneError

    at = f"{where}: " if where else ""
    if isinstance(exc, KeyboardInterrupt):
        return 130, f"layerprune: {at}interrupted"
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        writing = f" while writing {exc.filename}" if exc.filename else ""
        return EXIT_USER_ERROR, (f"layerprune {command}: error: {at}the disk or the file-size limit is full "
                                 f"({os.strerror(exc.errno)}){writing}; nothing was left half-written")
    user_error = isinstance(exc, (LayerpruneError, *USER_OS_ERRORS)) or (
        isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES))
    if user_error and not isinstance(exc, InternalError):
        return EXIT_USER_ERROR, f"layerprune {command}: error: {at}{exc} ({type(exc).__name__})"
    traceback.print_exception(exc)
    return EXIT_INTERNAL_ERROR, f"layerprune {command}: {at}{REPORT_BUG}"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (layerprune's own errors, a missing or unreadable file, a full disk) is one
    error line and exit 2; anything else, InternalError included, is a bug: its traceback and exit 70. Under
    torchrun (WORLD_SIZE > 1) every rank ends with the line of the rank that failed (:mod:`layerprune.cli.torchrun`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from layerprune.cli import torchrun

        if torchrun.wants_distributed(args):
            return torchrun.run(args, failure)
        return int(args.run(args) or 0)
    except (KeyboardInterrupt, Exception) as exc:
        code, line = failure(args.command, exc)
        print(line, file=sys.stderr)
        return code
    finally:
        from layerprune.cli.args import release_outputs

        release_outputs()


__all__ = ["SUBCOMMANDS", "build_parser", "failure", "main"]
