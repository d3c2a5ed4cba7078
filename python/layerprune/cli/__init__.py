"""The `layerprune` command line.

Each subcommand lives in `layerprune/cli/<name>.py` with `add_parser(subparsers)` and `run(args) -> int`;
this module only dispatches and maps errors to one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("eval", "allocate", "prune", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerprune",
        description="Structured pruning of Llama-family language models (Llama, Mistral, Qwen2, Qwen3): "
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
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE
REPORT_BUG = "this is a bug in layerprune: please report it with the traceback above"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (layerprune's own errors, a missing or unreadable file, a full disk) is one
    error line and exit 2; anything else, InternalError included, is a bug: its traceback and exit 70."""
    import errno
    import traceback

    from layerprune.errors import InternalError, LayerpruneError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130
    except InternalError:
        traceback.print_exc()
        print(f"layerprune {args.command}: {REPORT_BUG}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    except (LayerpruneError, *USER_OS_ERRORS) as exc:
        print(f"layerprune {args.command}: error: {exc} ({type(exc).__name__})", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            print(f"layerprune {args.command}: error: {exc} ({type(exc).__name__})", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"layerprune {args.command}: {REPORT_BUG}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    except Exception:
        traceback.print_exc()
        print(f"layerprune {args.command}: {REPORT_BUG}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
