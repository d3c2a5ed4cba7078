"""Per-rank peak memory of Taylor scoring on an FSDP2-sharded model, against the single-process GradientScorer.

Three runs on random weights of ``--shape``, each in fresh processes, all scoring the same ``--tokens``:

* ``single``: one process, the plain model, ``GradientScorer`` (every weight, the activations, the gradients
  in flight);
* ``fsdp-1``, ``fsdp-2``: the model sharded with FSDP2 (``layerprune.scoring.sharded``) over 1 and 2 ranks
  launched by torchrun (gloo on CPU, NCCL on CUDA), each rank back-propagating its share of the tokens.

Per rank: the tensor bytes it holds before scoring (its weights, or its shard of them), the peak above that
while scoring (CPU: torch.profiler's allocation events replayed, as in bench_scoring_memory.py; CUDA:
max_memory_allocated) and their sum, plus the peak RSS. The single run also measures the bytes autograd saves
for the backward per token, inside the decoder layers and in the head (saved-tensor hooks). A term-by-term model of the peak
(:func:`modelled_peak`) is printed beside each measurement, then used to project the per-GPU peak of FSDP
Taylor scoring for Llama-3-70B in bfloat16 on 8 GPUs. ``--from-json`` redoes the figures from a saved run.
Never asserts.

    python benches/bench_fsdp_memory.py [--shape smollm2|tiny] [--tokens 256] [--seq-len 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

from bench_scoring_memory import _cpu_tensor_peak, _rss_peak_bytes  # noqa: E402

from layerprune.atomic import write_json_atomic  # noqa: E402

SHAPES = {
    # SmolLM2-135M's shape (bench_scoring_memory.py's random model)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
LLAMA3_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
GIB = 2**30


def _config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, **shape)


def _random_model(shape: str):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config(SHAPES[shape])).eval()


def _held_bytes(model) -> int:
    """Bytes of this rank's parameters and buffers (a DTensor counts its local shard)."""
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _saved_for_backward(model, ids) -> dict[str, int]:
    """Bytes autograd saves for the backward of the loss (parameters excluded), inside the decoder layers and
    outside them (embeddings, final norm, head, loss), with only the decoder Linear weights requiring grad."""
    import torch

    from layerprune.arch import adapter_for

    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    scored = {id(lin.weight) for layer in layers for lin in adapter.projections(layer).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in scored)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside, seen, saved = [False], set(), {"layers": 0, "head": 0}
    handles = [h for layer in layers for h in (
        layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
        layer.register_forward_hook(lambda *a: inside.__setitem__(0, False)))]

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved["layers" if inside[0] else "head"] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False).loss
    finally:
        for h in handles:
            h.remove()
    return saved


def child(mode: str, shape: str, tokens: int, seq_len: int, out_dir: Path) -> None:
    import torch

    from layerprune import distributed
    from layerprune.scoring.groups import element_group_scores

    model = _random_model(shape)
    ids = torch.randint(0, model.config.vocab_size, (max(1, tokens // seq_len), seq_len),
                        generator=torch.Generator().manual_seed(1))
    rank, world = 0, 1
    if mode == "fsdp":
        from layerprune.scoring.sharded import shard_model

        distributed.initialize("auto")
        rank, world = distributed.rank(), max(distributed.world_size(), 1)
        device = distributed.model_device()
        model.to(device)
        ids = distributed.local_samples(ids).to(device)
        shard_model(model)
    device = ids.device
    held = _held_bytes(model)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        element_group_scores(model, ids, importance="taylor", progress=False)
        torch.cuda.synchronize()
        peak_over, rss = torch.cuda.max_memory_allocated() - base, None
    else:
        rss_base = _rss_peak_bytes()
        peak_over = _cpu_tensor_peak(lambda: element_group_scores(model, ids, importance="taylor", progress=False))
        rss = _rss_peak_bytes() - rss_base
    row = {"mode": mode if mode == "single" else f"fsdp-{world}", "rank": rank, "world": world, "shape": shape,
           "device": device.type, "tokens_per_rank": int(ids.numel()), "held_bytes": held,
           "peak_over_held_bytes": int(peak_over), "peak_bytes": int(held + peak_over),
           "peak_rss_over_loaded_bytes": rss, "seconds": round(time.perf_counter() - t0, 2)}
    if mode == "single":
        row["saved_for_backward_bytes"] = _saved_for_backward(model, ids)
    (out_dir / f"{row['mode']}-rank{rank}.json").write_text(json.dumps(row))
    if mode == "fsdp":
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"[fsdp-memory] {' '.join(cmd[:6])} ... failed:\n{done.stderr[-3000:]}")


def activation_coefficients(single: dict, shape: dict) -> dict[str, float]:
    """Saved-for-backward elements per token, per decoder layer and unit of width ``d + I`` (``layers``), and
    per token and vocabulary entry in the head (``head``), from the single run (float32)."""
    saved, tokens = single["saved_for_backward_bytes"], single["tokens_per_rank"]
    width = shape["hidden_size"] + shape["intermediate_size"]
    return {"layers": saved["layers"] / (4 * tokens * shape["num_hidden_layers"] * width),
            "head": saved["head"] / (4 * tokens * shape["vocab_size"])}


def modelled_peak(shape: dict, coefficients: dict[str, float], *, world: int, tokens: int, dtype_bytes: int,
                  sharded: bool) -> dict[str, float]:
    """Bytes one rank holds at the peak of Taylor scoring, term by term:

    * ``weights``: its shard (all of them in one process);
    * ``root_gathered`` (FSDP): the embeddings and head, which FSDP keeps gathered through the step;
    * ``layer_gathered`` (FSDP): one decoder layer gathered, its weights and unsharded gradient; in one
      process ``gradients_in_flight``, one layer's gradients before the scorer drops them;
    * ``gradient_shard`` (FSDP): one layer's reduced gradient shard, until it is scored;
    * ``activations``: what autograd saves for its tokens (the head's logits in float32, as the loss computes them).
    """
    from layerprune.allocation import spec_from_model_config

    spec = spec_from_model_config(_config(shape), 0.1)
    layer, total = spec.layers[0].params(), spec.params_total
    d, vocab = shape["hidden_size"], shape["vocab_size"]
    root = vocab * d * (1 if shape.get("tie_word_embeddings") else 2)
    width = d + shape["intermediate_size"]
    terms = {"weights": total * dtype_bytes / (world if sharded else 1)}
    if sharded:
        terms.update(root_gathered=root * dtype_bytes, layer_gathered=2 * layer * dtype_bytes,
                     gradient_shard=layer * dtype_bytes / world)
    else:
        terms["gradients_in_flight"] = layer * dtype_bytes
    terms["activations"] = tokens * (shape["num_hidden_layers"] * coefficients["layers"] * width * dtype_bytes
                                     + coefficients["head"] * vocab * 4)
    return terms


def projection(coefficients: dict[str, float], tokens_per_gpu: list[int], gpus: int = 8) -> list[dict]:
    """Per-GPU peak of FSDP Taylor scoring for Llama-3-70B in bfloat16 on ``gpus`` GPUs (:func:`modelled_peak`
    with the measured activation coefficients), against one GPU scoring all the tokens alone."""
    rows = []
    for t in tokens_per_gpu:
        terms = modelled_peak(LLAMA3_70B, coefficients, world=gpus, tokens=t, dtype_bytes=2, sharded=True)
        alone = modelled_peak(LLAMA3_70B, coefficients, world=1, tokens=t * gpus, dtype_bytes=2, sharded=False)
        rows.append({"model": "Llama-3-70B bf16", "gpus": gpus, "tokens_per_gpu": t,
                     **{f"{k}_gib": round(v / GIB, 2) for k, v in terms.items()},
                     "peak_gib": round(sum(terms.values()) / GIB, 1),
                     "one_gpu_all_tokens_gib": round(sum(alone.values()) / GIB, 1)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="random-weight model shape")
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens, shared by the ranks")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ranks", default="1,2", help="FSDP world sizes to measure (default: 1,2)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--from-json", type=Path, help="print the figures of a run saved with --json (no measuring)")
    ap.add_argument("--child", choices=["single", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.shape, args.tokens, args.seq_len, args.out_dir)
        return 0
    if args.from_json:
        rows = json.loads(args.from_json.read_text())["rows"]
        coefficients, projected = report(rows, rows[0]["shape"])
        if args.json:
            write_json_atomic(args.json, {"rows": rows, "activation_coefficients": coefficients, "projection": projected})
        return 0
    common = ["--shape", args.shape, "--tokens", str(args.tokens), "--seq-len", str(args.seq_len)]
    with tempfile.TemporaryDirectory(prefix="layerprune-fsdp-memory-") as tmp:
        _run([sys.executable, __file__, "--child", "single", "--out-dir", tmp, *common])
        for world in (int(w) for w in args.ranks.split(",")):
            _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
                  "127.0.0.1", "--master-port", str(_free_port()), __file__, "--child", "fsdp", "--out-dir", tmp,
                  *common])
        rows = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("*.json"))]
    rows.sort(key=lambda r: (r["world"] if r["mode"] != "single" else 0, r["rank"]))
    coefficients, projected = report(rows, args.shape)
    if args.json:
        write_json_atomic(args.json, {"rows": rows, "activation_coefficients": coefficients, "projection": projected})
    return 0


def report(rows: list[dict], shape: str) -> tuple[dict[str, float], list[dict]]:
    """Print the measured rows, the model beside them and the projection."""
    single = next(r for r in rows if r["mode"] == "single")
    for r in rows:
        rss = "" if r["peak_rss_over_loaded_bytes"] is None else f", RSS +{r['peak_rss_over_loaded_bytes'] / 2**20:.1f} MiB"
        print(f"{r['mode']:7s} rank {r['rank']} {r['device']} tokens={r['tokens_per_rank']:<5d} held "
              f"{r['held_bytes'] / 2**20:7.1f} MiB + peak while scoring {r['peak_over_held_bytes'] / 2**20:7.1f} MiB "
              f"= {r['peak_bytes'] / 2**20:7.1f} MiB{rss} ({r['seconds']:.1f} s)", flush=True)
    saved = single["saved_for_backward_bytes"]
    print(f"saved for backward per token: {saved['layers'] / single['tokens_per_rank'] / 2**10:.1f} KiB in the "
          f"decoder layers, {saved['head'] / single['tokens_per_rank'] / 2**10:.1f} KiB in the head")
    coefficients = activation_coefficients(single, SHAPES[shape])
    for r in rows:
        terms = modelled_peak(SHAPES[shape], coefficients, world=r["world"], tokens=r["tokens_per_rank"],
                              dtype_bytes=4, sharded=r["mode"] != "single")
        r["modelled_peak_bytes"] = int(sum(terms.values()))
        print(f"{r['mode']:7s} rank {r['rank']}: modelled {r['modelled_peak_bytes'] / 2**20:7.1f} MiB, measured "
              f"{r['peak_bytes'] / 2**20:7.1f} MiB (modelled / measured {r['modelled_peak_bytes'] / r['peak_bytes']:.2f})")
    projected = projection(coefficients, [256, 2048, 8192])
    for p in projected:
        print(f"projection {p['model']} on {p['gpus']} GPUs, {p['tokens_per_gpu']} tokens per GPU: "
              f"{p['peak_gib']:.1f} GiB per GPU (weights {p['weights_gib']}, embeddings+head gathered "
              f"{p['root_gathered_gib']}, gathered layer {p['layer_gathered_gib']}, gradient shard "
              f"{p['gradient_shard_gib']}, activations {p['activations_gib']}); one GPU with all "
              f"{p['tokens_per_gpu'] * p['gpus']} tokens: {p['one_gpu_all_tokens_gib']} GiB")
    return coefficients, projected


if __name__ == "__main__":
    raise SystemExit(main())
