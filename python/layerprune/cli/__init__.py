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


def main(argv: list[str] | None = None) -> int:
    from layerprune.errors import LayerpruneError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130
    except (LayerpruneError, ValueError, FileNotFoundError, OSError) as exc:
        name = type(exc).__name__
        print(f"layerprune {args.command}: error: {exc} ({name})", file=sys.stderr)
        return 2


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
