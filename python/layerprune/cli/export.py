"""`layerprune export`: write a pruned (or plain) model as a GGUF file that llama.cpp runs.

    layerprune export --model PRUNED_DIR --format gguf --out FILE.gguf [--outtype f32|f16|bf16|q8_0] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from layerprune.cli.args import add_runtime_arguments, apply_threads, check_outside_inputs, hold_output

FORMATS = ("gguf",)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from layerprune.export.gguf import OUTTYPES

    p = subparsers.add_parser(
        "export",
        help="write a pruned or plain model as GGUF (llama.cpp)",
        description="Write a folder saved by `layerprune prune` (or a plain Hugging Face folder of a supported "
        "family, or smollm2-135m) as one GGUF file. Layers of different widths are written as llama.cpp's `deci` "
        "architecture with per-layer head counts and feed-forward lengths; equal widths keep the family's own "
        "architecture. The tokenizer is carried over.",
    )
    p.add_argument("--model", required=True, help="a folder written by `layerprune prune`, a plain model folder, "
                   "or smollm2-135m")
    p.add_argument("--format", choices=FORMATS, default="gguf", help="output format (default: gguf)")
    p.add_argument("--out", required=True, help="the file to write (FILE.gguf)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="type of the weight matrices (default: f16); norms and biases stay f32")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    add_runtime_arguments(p, device=False)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from layerprune.export.gguf import check_output_path, export_gguf

    check_outside_inputs(args.out, args.model)
    hold_output(args.out)  # one writer of --out at a time
    check_output_path(args.out, args.overwrite)  # before the (slow) model load
    apply_threads(args)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    import torch

    result = export_gguf(args.model, args.out, outtype=args.outtype, overwrite=args.overwrite,
                         dtype=getattr(torch, args.dtype))
    layout = result.layout

    def _span(values: tuple[int, ...]) -> str:
        return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"

    for note in layout.notes:
        print(f"layerprune export: note: {note}", file=sys.stderr)
    types = ", ".join(f"{n} {name}" for name, n in sorted(result.tensor_types.items()))
    print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.tensors} tensors: {types})")
    print(f"architecture: {layout.architecture}, {len(layout.num_q_heads)} layers, "
          f"{_span(layout.num_q_heads)} heads / {_span(layout.num_kv_heads)} KV heads of {layout.head_dim}, "
          f"feed-forward {_span(layout.intermediate)}" + (" (per-layer arrays)" if layout.per_layer else ""))
    print(f"tokenizer: {result.tokenizer}")
    return 0
