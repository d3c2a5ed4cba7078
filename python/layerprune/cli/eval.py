"""`layerprune eval`: parameter count and WikiText-2 (or any text file) perplexity of a model."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from layerprune.atomic import write_json_atomic
from layerprune.cli.args import add_model_argument, add_runtime_arguments, apply_threads, check_device
from layerprune.errors import InvalidInputError


RUNTIMES = ("auto", "transformers", "llama.cpp")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="parameter count and perplexity of a model",
        description="Print the parameter count (embeddings, attention, MLP, norms) and the perplexity of a "
        "model, with LLM-Pruner's protocol: the test split joined with blank lines, tokenized once, cut into "
        "non-overlapping windows of --seq-len tokens.",
    )
    add_model_argument(p)
    p.add_argument("--dataset", default="wikitext2", help="'wikitext2' or a path to a .txt file (default: wikitext2)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with WikiText-2 raw test.txt / valid.txt (default: $LAYERPRUNE_DATA_DIR, else the datasets library)",
    )
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--seq-len", type=int, default=128, help="window length in tokens (default: 128)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the results as JSON ('-' = stdout)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="what runs the model: transformers, or llama.cpp for a .gguf file (default auto: llama.cpp "
                   "for .gguf when llama-cpp-python is installed, transformers otherwise)")
    add_runtime_arguments(p)
    p.set_defaults(run=run)
    return p


def _validate(args: argparse.Namespace) -> None:
    """Cheap checks, done before any model is loaded."""
    if args.seq_len < 2:
        raise InvalidInputError(f"--seq-len must be at least 2; got {args.seq_len}")
    if args.batch_size < 1:
        raise InvalidInputError(f"--batch-size must be positive; got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise InvalidInputError(
            f"--max-tokens {args.max_tokens} is smaller than one window of --seq-len {args.seq_len}"
        )
    if args.json_out not in (None, "-"):
        parent = Path(args.json_out).expanduser().resolve().parent
        if not parent.is_dir():
            raise InvalidInputError(f"--json {args.json_out}: folder {parent} does not exist")
        if Path(args.json_out).is_dir():
            raise InvalidInputError(f"--json {args.json_out} is a folder; give a file name")


def _runtime(args: argparse.Namespace) -> str:
    """``llama.cpp`` or ``transformers``, from --runtime and --model (checked before any model is loaded)."""
    from layerprune.evaluation.llamacpp import INSTALL_HINT, llama_cpp_available

    is_gguf = str(args.model).endswith(".gguf") and Path(args.model).expanduser().is_file()
    if args.runtime == "llama.cpp" and not is_gguf:
        raise InvalidInputError(f"--runtime llama.cpp runs a .gguf file; --model {args.model} is not one")
    if args.runtime == "llama.cpp" and not llama_cpp_available():
        raise InvalidInputError(f"--runtime llama.cpp needs llama-cpp-python: {INSTALL_HINT}")
    if args.runtime == "auto":
        return "llama.cpp" if is_gguf and llama_cpp_available() else "transformers"
    return args.runtime


def format_parameters(params: dict[str, int]) -> str:
    parts = [
        f"embeddings {params['embeddings']:,}",
        f"attention {params['attention']:,}",
        f"MLP {params['mlp']:,}",
        f"norms {params['norms']:,}",
    ]
    if params["lm_head"]:
        parts.append(f"lm_head {params['lm_head']:,}")
    if params["other"]:
        parts.append(f"other {params['other']:,}")
    tied = "" if params["lm_head"] else " (lm_head tied to embeddings)"
    return f"parameters: {params['total']:,} = " + " + ".join(parts) + tied


def run(args: argparse.Namespace) -> int:
    import torch

    from layerprune import data, evaluation, models

    _validate(args)
    check_device(args.device)
    apply_threads(args)
    started = time.perf_counter()
    out: TextIO = sys.stderr if args.json_out == "-" else sys.stdout
    progress = not args.no_progress
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    # Find the data before the (slow) model load: a missing dataset fails fast.
    rows = data.load_rows(args.dataset, args.split, args.data_dir)
    split = None if data.is_text_file_dataset(args.dataset) else data.normalize_split(args.split)
    runtime = _runtime(args)
    if runtime == "llama.cpp":
        from layerprune.evaluation.llamacpp import LlamaCppModel, gguf_perplexity, gguf_summary

        device, args.dtype = "cpu", "gguf"
        params, info = gguf_summary(args.model)
        llm = LlamaCppModel(args.model, n_ctx=args.seq_len + 1, threads=args.threads)  # + a window prefix
        tokens = torch.tensor(llm.tokenize("\n\n".join(rows)), dtype=torch.long)
        if args.max_tokens is not None:
            tokens = tokens[: args.max_tokens]
        eval_started = time.perf_counter()
        result = gguf_perplexity(llm, tokens.numpy(), seq_len=args.seq_len, progress=progress)
        eval_seconds = time.perf_counter() - eval_started
        llm.close()
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = models.load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
        params = models.count_parameters(model)
        info = models.model_info(model)
        tokens = data.tokenize_text(tokenizer, "\n\n".join(rows))
        if args.max_tokens is not None:
            tokens = tokens[: args.max_tokens]
        eval_started = time.perf_counter()
        result = evaluation.perplexity(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                                       progress=progress)
        eval_seconds = time.perf_counter() - eval_started

    heads = sorted(set(info["heads"]))
    kv_heads = sorted(set(info["kv_heads"]))
    inter = sorted(set(info["intermediate"]))

    def _span(values: list[int]) -> str:
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    print(
        f"model: {args.model} ({info['architecture']}, {info['layers']} layers, hidden {info['hidden']}, "
        f"{_span(heads)} heads / {_span(kv_heads)} KV heads of {info['head_dim']}, intermediate {_span(inter)}, "
        f"{args.dtype} on {device}" + (", llama.cpp)" if runtime == "llama.cpp" else ")"),
        file=out,
    )
    print(format_parameters(params), file=out)
    print(
        f"data: {args.dataset} {split or ''}".rstrip()
        + f": {result['tokens']:,} tokens in {result['windows']} windows of {result['seq_len']} "
        f"({result['predicted_tokens']:,} predicted)",
        file=out,
    )
    print(f"perplexity: {result['ppl']:.4f} (mean NLL {result['nll']:.5f} nats, {eval_seconds:.1f} s)", file=out)

    if args.json_out is not None:
        payload = {
            "model": args.model,
            "dataset": args.dataset,
            "split": split,
            "data_dir": None if args.data_dir is None else str(args.data_dir),
            "seq_len": result["seq_len"],
            "max_tokens": args.max_tokens,
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": device,
            "runtime": runtime,
            "ppl": result["ppl"],
            "nll": result["nll"],
            "tokens": result["tokens"],
            "predicted_tokens": result["predicted_tokens"],
            "windows": result["windows"],
            "params": params,
            "model_info": info,
            "eval_seconds": eval_seconds,
            "seconds": time.perf_counter() - started,
        }
        if args.json_out == "-":
            json.dump(payload, sys.stdout, indent=2)
            sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            write_json_atomic(args.json_out, payload)
    return 0
