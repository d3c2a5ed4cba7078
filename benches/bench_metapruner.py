"""Construct-and-step time of ``layerprune.torch_pruning.MetaPruner`` against Torch-Pruning's own ``MetaPruner``.

Both prune the same model the way LLM-Pruner's ``llama3.py --block_wise`` does: first-order Taylor importance
after one backward on the same calibration batch, layers [start, L-1) at ``--ratio``, whole KV groups and MLP
channels, the hidden size untouched.

* layerprune: LLM-Pruner's arguments verbatim (``consecutive_groups``, ``root_instances``, ``ch_sparsity``, ...).
* Torch-Pruning: it refuses those (``consecutive_groups`` and ``root_instances`` do not exist in 1.6), so the
  nearest call it accepts is timed: ``pruning_ratio_dict`` on k_proj / gate_proj, ``num_heads`` with
  ``prune_num_heads=True, prune_head_dims=False`` (it removes query heads, and keeps the KV heads under GQA),
  ``ignored_layers=[lm_head]``, ``output_transform`` to the logits. Twice: on the model as loaded (``use_cache``
  on, as in ``llama3.py``) and with ``use_cache=False``. Each runs in a child process, killed after ``--timeout``
  seconds: then the row reads "did not finish in N s" and says whether it was still constructing or stepping.

Token ids are drawn at random (seeded): timings do not depend on the text. Model loading and the backward are
timed apart and are the same for both. Prints a table; ``--json OUT`` writes the rows. Never fails on time.

    python benches/bench_metapruner.py [--model smollm2-135m] [--ratio 0.25] [--timeout 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from layerprune.atomic import write_json_atomic


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a Hugging Face folder")
    parser.add_argument("--ratio", type=float, default=0.25, help="per-layer rate in the layer range")
    parser.add_argument("--layer-start", type=int, default=3, help="first pruned layer (the range ends at L-1)")
    parser.add_argument("--calib-samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds Torch-Pruning gets to construct and step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both pruners)")
    parser.add_argument("--skip-torch-pruning", action="store_true")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--child", choices=("torch-pruning",), help=argparse.SUPPRESS)
    parser.add_argument("--use-cache", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepared_model(args, use_cache=False):
    """The model with gradients of one backward on a seeded random batch, and that batch."""
    from layerprune.models import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, require_tokenizer=False)
    if not use_cache:
        model.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.calib_samples, args.seq_len), generator=generator)
    for p in model.parameters():
        p.requires_grad_(True)
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return model, ids, time.perf_counter() - start


def head_counts(layers) -> dict:
    return {"q_heads": [layer.self_attn.q_proj.out_features // layer.self_attn.head_dim for layer in layers],
            "kv_heads": [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in layers]}


def pruned_layers(model, args):
    return range(args.layer_start, len(model.model.layers) - 1)


def run_layerprune(args) -> dict:
    import layerprune.torch_pruning as tp

    model, ids, backward = prepared_model(args)
    layers = model.model.layers
    chosen = pruned_layers(model, args)
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, ids[:1], importance=tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None),
        global_pruning=False, iterative_steps=1, ch_sparsity=args.ratio, ignored_layers=[], channel_groups={},
        consecutive_groups={layer.self_attn.k_proj: layer.self_attn.head_dim for layer in layers},
        customized_pruners={type(model.model.norm): tp.RMSNormPruner()}, root_module_types=None,
        root_instances=[layers[i].self_attn.k_proj for i in chosen] + [layers[i].mlp.gate_proj for i in chosen],
    )
    constructed = time.perf_counter()
    pruner.step()
    stepped = time.perf_counter()
    return {"pruner": "layerprune.torch_pruning", "status": "finished", "backward_s": round(backward, 3),
            "construct_s": round(constructed - start, 3), "step_s": round(stepped - constructed, 3),
            "total_s": round(stepped - start, 3), "params_before": before,
            "params_after": sum(p.numel() for p in model.parameters()),
            **head_counts(layers), "note": "LLM-Pruner's llama3.py arguments verbatim"}


def torch_pruning_child(args) -> None:
    """Runs in the child: prints one JSON line per stage, so the parent knows how far it got."""
    import torch_pruning as tp

    model, ids, backward = prepared_model(args, use_cache=args.use_cache)
    layers = model.model.layers
    chosen = list(pruned_layers(model, args))
    before = sum(p.numel() for p in model.parameters())
    verbatim = None
    try:
        tp.pruner.MetaPruner(model, ids[:1], importance=tp.importance.GroupTaylorImportance(), ch_sparsity=args.ratio,
                             consecutive_groups={}, root_instances=[], root_module_types=None)
    except TypeError as exc:
        verbatim = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"stage": "ready", "backward_s": round(backward, 3), "params_before": before,
                      "verbatim_error": verbatim}), flush=True)
    num_heads = {}
    for layer in layers:
        attn = layer.self_attn
        num_heads[attn.q_proj] = attn.q_proj.out_features // attn.head_dim
        num_heads[attn.k_proj] = num_heads[attn.v_proj] = attn.k_proj.out_features // attn.head_dim
    rates = {layers[i].self_attn.k_proj: args.ratio for i in chosen}
    rates.update({layers[i].mlp.gate_proj: args.ratio for i in chosen})
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, ids[:1], importance=tp.importance.GroupTaylorImportance(), pruning_ratio=0.0, pruning_ratio_dict=rates,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio_dict={layers[i].self_attn: args.ratio for i in chosen}, ignored_layers=[model.lm_head],
        output_transform=lambda out: out.logits,
    )
    print(json.dumps({"stage": "constructed", "construct_s": round(time.perf_counter() - start, 3)}), flush=True)
    constructed = time.perf_counter()
    pruner.step()
    stepped = time.perf_counter()
    print(json.dumps({"stage": "stepped", "step_s": round(stepped - constructed, 3), "total_s": round(stepped - start, 3),
                      "params_after": sum(p.numel() for p in model.parameters()), **head_counts(layers)}), flush=True)


def run_torch_pruning(args, use_cache: bool) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "torch-pruning", "--model", args.model,
               "--ratio", str(args.ratio), "--layer-start", str(args.layer_start), "--calib-samples",
               str(args.calib_samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    command += ["--use-cache"] if use_cache else []
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    variant = "use_cache as loaded" if use_cache else "use_cache=False"
    row: dict = {"pruner": f"torch_pruning {_torch_pruning_version()} ({variant})", "status": "failed",
                 "use_cache": use_cache}
    deadline = None
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            line = lines.get(timeout=wait)
            late = line is not None and deadline is not None and time.monotonic() > deadline
        except queue.Empty:
            line, late = "", True
        if late:
            child.kill()
            child.wait()
            stage = "constructing" if "construct_s" not in row else "stepping"
            row.update(status="timeout", note=f"did not finish in {args.timeout:g} s (still {stage})")
            return row
        if line is None:
            break
        event = json.loads(line)
        row.update({k: v for k, v in event.items() if k != "stage"})
        if event["stage"] == "ready":
            deadline = time.monotonic() + args.timeout  # loading and the backward do not count
        if event["stage"] == "stepped":
            row["status"] = "finished"
    child.wait()
    if row["status"] != "finished":
        assert child.stderr is not None
        tail = child.stderr.read().strip().splitlines()
        row["note"] = f"exited with {child.returncode}: {tail[-1] if tail else 'no message'}"
    return row


def _torch_pruning_version() -> str:
    from importlib.metadata import version

    return version("torch-pruning")


def print_table(rows) -> None:
    print("| pruner | construct (s) | step (s) | construct + step (s) | params after | note |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        def cell(key):
            value = row.get(key)
            return "-" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:.2f}")

        note = row.get("note", "")
        if row.get("verbatim_error"):
            note = f"{note}; LLM-Pruner's arguments: {row['verbatim_error']}".lstrip("; ")
        print(f"| {row['pruner']} | {cell('construct_s')} | {cell('step_s')} | {cell('total_s')} | "
              f"{cell('params_after')} | {note} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        torch_pruning_child(args)
        return 0
    rows = [run_layerprune(args)]
    for use_cache in () if args.skip_torch_pruning else (True, False):
        theirs = run_torch_pruning(args, use_cache)
        if theirs["status"] == "finished":
            same = all(theirs.get(k) == rows[0][k] for k in ("q_heads", "kv_heads"))
            theirs["note"] = "nearest Torch-Pruning 1.6 call" + ("" if same else
                                                                 ": other heads (query heads inside KV groups)")
        rows.append(theirs)
    for row in rows:
        row.update(model=args.model, ratio=args.ratio, layer_start=args.layer_start, threads=args.threads,
                   timeout_s=args.timeout)
    print_table(rows)
    if args.json:
        write_json_atomic(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
