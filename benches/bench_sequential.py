"""Layer-by-layer pruning (`layerprune prune --sequential`) of a random checkpoint with Llama-3.2-3B's shapes.

Writes a random-weight checkpoint with Llama-3.2-3B's shapes to a temporary folder: 28 layers, hidden 3072,
head_dim 128, 24 query / 8 KV heads, MLP 8192, vocabulary 128256 (tied), llama3 rope scaling, bfloat16, in
shards of at most 5 GB (6.4 GB in all). Then, in a child process, prunes it 25% layer by layer on the CPU
(`layerprune.export.prune_checkpoint`, what `prune --sequential` runs: Block Influence, Wanda scores, dp)
with a small calibration set of random token ids (time and memory do not depend on the text).

Prints the wall time of every layer in both passes, the child's peak RSS and peak RSS / checkpoint bytes
next to the RSS of the imports alone, and the same figures projected for Llama-3-8B and Llama-3-70B from the
measured per-layer figures. `--layers N` (N >= 2) runs a shorter checkpoint of the same shapes. Never asserts.

    python benches/bench_sequential.py [--layers 28] [--calib-samples 10] [--calib-seq-len 64] [--threads 1]
        [--workdir DIR] [--keep] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from layerprune.atomic import write_json_atomic  # noqa: E402

GB = 10**9
# (layers, hidden, query heads, KV heads, head_dim, MLP, vocabulary, tied embeddings)
SHAPES = {
    "Llama-3.2-3B": (28, 3072, 24, 8, 128, 8192, 128256, True),
    "Llama-3-8B": (32, 4096, 32, 8, 128, 14336, 128256, False),
    "Llama-3-70B": (80, 8192, 64, 8, 128, 28672, 128256, False),
}
DTYPE_BYTES = 2  # bfloat16


def _config(layers: int):
    from transformers import LlamaConfig

    _, hidden, heads, kv, head_dim, mlp, vocab, tied = SHAPES["Llama-3.2-3B"]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        dtype="bfloat16",
    )


def write_checkpoint(folder: Path, layers: int) -> int:
    """A random bf16 checkpoint of the 3B shapes, written tensor by tensor (never whole in memory); its bytes."""
    import torch

    from layerprune.export import SafetensorsShardWriter
    from layerprune.models.checkpoint import empty_model, expected_tensors

    config = _config(layers)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shapes = expected_tensors(empty_model(config, torch.bfloat16))
    writer = SafetensorsShardWriter(folder, max_shard_bytes=5 * GB)
    writer.plan({name: (torch.bfloat16, shape) for name, shape in shapes.items()})
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.write(name, torch.ones(shape, dtype=torch.bfloat16))
            continue
        step = max(1, (64 * 2**20) // (shape[1] * DTYPE_BYTES))
        for start in range(0, shape[0], step):
            rows = torch.randn((min(step, shape[0] - start), shape[1]), generator=generator, dtype=torch.bfloat16)
            writer.write_rows(name, rows.mul_(0.02), start, shape)
    writer.close()
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(folder: Path, out: Path, samples: int, seq_len: int, threads: int) -> dict:
    """Prune in this process; the peak RSS (ru_maxrss) covers the whole run, imports included."""
    import torch

    torch.set_num_threads(threads)
    from layerprune.export import prune_checkpoint
    from layerprune.pruning import PruneConfig

    import layerprune.pruning.sequential  # noqa: F401  (every import the run needs, before the baseline)
    from transformers import LlamaForCausalLM  # noqa: F401

    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vocab = SHAPES["Llama-3.2-3B"][6]
    calib = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(ratio=0.25, mode="unbalanced", solver="dp", layer_importance="activation",
                         importance="activation", calib_samples=samples, calib_seq_len=seq_len)
    t0 = time.perf_counter()
    folder_out, result = prune_checkpoint(folder, config, out, dtype=torch.bfloat16, calib_ids=calib,
                                          progress=False)
    seconds = time.perf_counter() - t0
    report = result.report
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": rss_imports,
        "rss_at_end_bytes": _rss_now(),
        "seconds": seconds,
        "layers": report["sequential"]["layers"],
        "timings": report["timings"],
        "max_layer_bytes": report["sequential"]["max_layer_bytes"],
        "bytes_read": report["sequential"]["bytes_read"],
        "hidden_states": report["sequential"]["hidden_states"],
        "actual_ratio": report["actual_ratio"],
        "output_bytes": sum(f.stat().st_size for f in Path(folder_out).glob("*.safetensors")),
    }


def layer_params(name: str) -> int:
    from layerprune.arch.budget import LayerShape

    _, hidden, heads, kv, head_dim, mlp, _, _ = SHAPES[name]
    return LayerShape(hidden, heads, kv, head_dim, mlp, norm_params=2 * hidden).params()


def checkpoint_bytes(name: str) -> int:
    layers, hidden, _, _, _, _, vocab, tied = SHAPES[name]
    return DTYPE_BYTES * (layers * layer_params(name) + vocab * hidden * (1 if tied else 2) + hidden)


def _stats(values: list[float]) -> str:
    med = statistics.median(values)
    return (f"min {min(values):.2f} s, median {med:.2f} s, max {max(values):.2f} s "
            f"(max/median {max(values) / med:.2f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28, help="decoder layers of the checkpoint (default: 28, the 3B's)")
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--calib-seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the pruning run (default: 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the pruned folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.layers < 2:
        ap.error("--layers: at least 2 (with one layer the 3B's embeddings leave less than 25% to remove)")
    if args.child:
        result = child(Path(args.child[0]), Path(args.child[1]), args.calib_samples, args.calib_seq_len, args.threads)
        print(json.dumps(result))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-sequential-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        ckpt_bytes = write_checkpoint(work / "checkpoint", args.layers)
        write_seconds = time.perf_counter() - t0
        print(f"checkpoint: Llama-3.2-3B shapes, {args.layers} layers, bfloat16, {ckpt_bytes / GB:.2f} GB "
              f"(written in {write_seconds:.0f} s to {work})", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "RAYON_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "--child", str(work / "checkpoint"), str(work / "pruned"),
               "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
               "--threads", str(args.threads)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if run.returncode != 0:
            print(run.stderr[-4000:], file=sys.stderr)
            return run.returncode
        r = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    per_pass: dict[str, list[float]] = {"importance": [], "prune": []}
    for rec in r["layers"]:
        per_pass[rec["pass"]].append(rec["seconds"])
    seconds_per_layer = [a + b for a, b in zip(per_pass["importance"], per_pass["prune"])]
    print(f"\npruned 25% layer by layer (Block Influence + Wanda scores + dp; {args.calib_samples} x "
          f"{args.calib_seq_len} calibration tokens; {args.threads} thread(s)) in {r['seconds']:.0f} s; "
          f"actual ratio {r['actual_ratio']:.4f}")
    print("\nlayer | importance pass (s) | prune + write pass (s) | both (s)")
    for l, (a, b) in enumerate(zip(per_pass["importance"], per_pass["prune"])):
        print(f"{l:5d} | {a:19.2f} | {b:22.2f} | {a + b:8.2f}")
    print(f"\nimportance pass per layer: {_stats(per_pass['importance'])}")
    print(f"prune pass per layer:      {_stats(per_pass['prune'])}")
    print(f"stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))

    peak, base = r["peak_rss_bytes"], r["rss_after_imports_bytes"]
    layer_bytes = r["max_layer_bytes"]
    print(f"\npeak RSS {peak / GB:.2f} GB = {peak / ckpt_bytes:.3f} x the checkpoint's {ckpt_bytes / GB:.2f} GB "
          f"(goal: at most 0.25 x); the imports alone (torch, transformers, layerprune) {base / GB:.2f} GB, "
          f"so the run adds {(peak - base) / GB:.2f} GB = {(peak - base) / layer_bytes:.2f} layers of "
          f"{layer_bytes / GB:.3f} GB")

    # Projections: time per layer scales with the layer's parameters (its matmuls and its bytes read, at a
    # fixed number of calibration tokens); the memory above the imports with the two layers the engine holds.
    measured = "Llama-3.2-3B"
    sec_layer = statistics.median(seconds_per_layer)
    extra_per_layer_byte = (peak - base) / layer_bytes
    print("\nshape                   | layers | layer GB | checkpoint GB | s / layer | total min | peak RSS GB | "
          "RSS / checkpoint | device GB (--device cuda)")
    projections = {}
    for name, shape in SHAPES.items():
        layers = shape[0] if name != measured else args.layers
        scale = layer_params(name) / layer_params(measured)
        this_layer = layer_params(name) * DTYPE_BYTES
        ckpt = checkpoint_bytes(name) if name != measured else ckpt_bytes
        rss = base + extra_per_layer_byte * this_layer if name != measured else peak
        # on a GPU: the layer, its pruned copy and the activations (the measured extra) move there
        device = extra_per_layer_byte * this_layer
        seconds = sec_layer * scale
        projections[name] = {"layers": layers, "layer_bytes": this_layer, "checkpoint_bytes": ckpt,
                             "seconds_per_layer": seconds, "total_seconds": seconds * layers, "peak_rss_bytes": rss,
                             "rss_over_checkpoint": rss / ckpt, "device_bytes": device,
                             "measured": name == measured}
        tag = " (measured)" if name == measured else ""
        print(f"{name + tag:23s} | {layers:6d} | {this_layer / GB:8.3f} | {ckpt / GB:13.1f} | {seconds:9.2f} | "
              f"{seconds * layers / 60:9.1f} | {rss / GB:11.2f} | {rss / ckpt:16.3f} | {device / GB:.1f}")
    big = projections["Llama-3-70B"]
    print(f"\nLlama-3-70B with --device cuda holds about {big['device_bytes'] / GB:.1f} GB on the device (two layers "
          f"of {big['layer_bytes'] / GB:.2f} GB and their activations): it fits on one 80 GB GPU "
          f"{'with room to spare' if big['device_bytes'] < 40 * GB else 'only just' if big['device_bytes'] < 80 * GB else 'NOT'}; "
          f"the host keeps about {big['peak_rss_bytes'] / GB:.1f} GB (projected from this CPU run).")
    if args.json:
        write_json_atomic(args.json, {
            "command": [sys.executable, *sys.argv], "layers": args.layers, "threads": args.threads,
            "calibration": [args.calib_samples, args.calib_seq_len],
            "peak_rss_bytes": peak, "checkpoint_bytes": ckpt_bytes, "rss_after_imports_bytes": base,
            "peak_rss_over_checkpoint": peak / ckpt_bytes, "seconds_per_layer": seconds_per_layer,
            "seconds_per_layer_by_pass": per_pass, "write_checkpoint_seconds": write_seconds, "run": r,
            "projections": projections,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
