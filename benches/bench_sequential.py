"""Layer-by-layer pruning (`layerprune prune --sequential`) of a random checkpoint with a Llama model's shapes.

Writes a random-weight bf16 checkpoint with the shapes of `--shape` (default Llama-3.2-3B: 28 layers, hidden 3072,
head_dim 128, 24 query / 8 KV heads, MLP 8192, vocabulary 128256 (tied), llama3 rope scaling) to a temporary
folder, in shards of at most 5 GB. Then, in a child process, prunes it 25% layer by layer on `--device`
(`layerprune.export.prune_checkpoint`, what `prune --sequential` runs: Block Influence, Wanda scores, dp, no refit)
with a small calibration set of random token ids (time and memory do not depend on the text).

Prints the wall time of every layer in both passes, the child's peak RSS and peak RSS / checkpoint bytes next to
the RSS of the imports alone, on CUDA the peak device memory (`torch.cuda.max_memory_allocated`), and the same
figures projected for Llama-3-8B and Llama-3-70B from the measured per-layer figures. `--layers N` (N >= 2) runs
a shorter checkpoint of the same shapes; `--shape tiny` is a toy shape for dry runs (benches/gpu_check.sh --quick).
With `--device cuda` the random weights are drawn on the GPU (faster to write). Never asserts.

    python benches/bench_sequential.py [--shape Llama-3.2-3B|Llama-3.1-8B|...|tiny] [--layers N] [--device cpu|cuda]
        [--calib-samples 10] [--calib-seq-len 64] [--threads 1] [--workdir DIR] [--keep] [--json OUT]
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
    "Llama-3.2-1B": (16, 2048, 32, 8, 64, 8192, 128256, True),
    "Llama-3.2-3B": (28, 3072, 24, 8, 128, 8192, 128256, True),
    "Llama-3-8B": (32, 4096, 32, 8, 128, 14336, 128256, False),
    "Llama-3.1-8B": (32, 4096, 32, 8, 128, 14336, 128256, False),
    "Llama-3-70B": (80, 8192, 64, 8, 128, 28672, 128256, False),
    "tiny": (4, 64, 8, 2, 8, 224, 512, False),  # a toy of the 8B's proportions, for dry runs
    "midi": (16, 1536, 12, 4, 128, 4096, 32000, True),  # 0.9 GB: tests/test_sequential_memory.py
}
# rope of each shape (Llama 3: no scaling, 8k positions; 3.1 / 3.2: llama3 scaling to 128k)
_LLAMA3_SCALING = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
ROPE = {
    "Llama-3.2-1B": (131072, {**_LLAMA3_SCALING, "factor": 32.0}),
    "Llama-3.2-3B": (131072, {**_LLAMA3_SCALING, "factor": 32.0}),
    "Llama-3-8B": (8192, {"rope_type": "default", "rope_theta": 500000.0}),
    "Llama-3.1-8B": (131072, {**_LLAMA3_SCALING, "factor": 8.0}),
    "Llama-3-70B": (8192, {"rope_type": "default", "rope_theta": 500000.0}),
    "tiny": (2048, {**_LLAMA3_SCALING, "factor": 8.0, "original_max_position_embeddings": 256}),
    "midi": (4096, {"rope_type": "default", "rope_theta": 500000.0}),
}
# the projections' rows (the measured shape is added when it is not one of them)
PROJECTED = ("Llama-3.2-3B", "Llama-3-8B", "Llama-3-70B")
DEFAULT_SHAPE = "Llama-3.2-3B"
DTYPE_BYTES = 2  # bfloat16
# What the layer-by-layer executor runs, by name (--method): PruneConfig fields. "activation" is the bench's first
# method (Block Influence, Wanda, no refit); "default" is PruneConfig's defaults resolved for the executor.
METHODS = {
    "activation": dict(layer_importance="activation", importance="activation", refit="none"),
    "activation-lstsq": dict(layer_importance="activation", importance="activation"),
    "default": {},
    "default-coarse": dict(mlp_step=256, curve_samples=2),  # the default with fewer, shorter curve points (tests)
    "removal": dict(layer_importance="removal", importance="l2", refit="none"),
    "uniform-obs": dict(mode="uniform", match_params=True, importance="obs"),
    "flap": dict(mode="flap", refit="bias", refit_error_correction=False),
}
DEFAULT_METHOD = "activation"


def _config(layers: int, shape: str = DEFAULT_SHAPE):
    from transformers import LlamaConfig

    _, hidden, heads, kv, head_dim, mlp, vocab, tied = SHAPES[shape]
    positions, rope = ROPE[shape]
    bos, eos = (128000, 128001) if vocab > 128001 else (1, 2)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
        max_position_embeddings=positions, rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos,
        rope_parameters=dict(rope), dtype="bfloat16",
    )


def write_checkpoint(folder: Path, layers: int, shape: str = DEFAULT_SHAPE, device: str = "cpu") -> int:
    """A random bf16 checkpoint of ``shape``, written tensor by tensor in blocks of rows (never whole in memory);
    its bytes. ``device="cuda"`` draws the random numbers on the GPU (other values than on the CPU)."""
    import torch

    from layerprune.export import SafetensorsShardWriter
    from layerprune.models.checkpoint import empty_model, expected_tensors

    config = _config(layers, shape)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shapes = expected_tensors(empty_model(config, torch.bfloat16))
    writer = SafetensorsShardWriter(folder, max_shard_bytes=5 * GB)
    writer.plan({name: (torch.bfloat16, shape) for name, shape in shapes.items()})
    generator = torch.Generator(device=device).manual_seed(0)
    for name, tensor_shape in shapes.items():
        if len(tensor_shape) == 1:
            writer.write(name, torch.ones(tensor_shape, dtype=torch.bfloat16))
            continue
        step = max(1, (64 * 2**20) // (tensor_shape[1] * DTYPE_BYTES))
        for start in range(0, tensor_shape[0], step):
            rows = torch.randn((min(step, tensor_shape[0] - start), tensor_shape[1]), generator=generator,
                               dtype=torch.bfloat16, device=device)
            writer.write_rows(name, rows.mul_(0.02).cpu(), start, tensor_shape)
    writer.close()
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its RSS now (Linux: ``/proc/self/clear_refs``), so that the peak
    read at the end is the run's, not an import's transient; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """VmHWM where /proc has it, else ru_maxrss (the process's whole-life peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(folder: Path, out: Path, samples: int, seq_len: int, threads: int, shape: str = DEFAULT_SHAPE,
          device: str = "cpu", method: str = DEFAULT_METHOD, refit_samples: int | None = None) -> dict:
    """Prune in this process. The baseline is the RSS once every import (and, on CUDA, the context) is in; the peak
    RSS is reset there (VmHWM), so it is the run's; the peak device memory is torch's allocator's over the run."""
    import torch

    torch.set_num_threads(threads)
    from layerprune.export import prune_checkpoint
    from layerprune.pruning import PruneConfig

    import layerprune.pruning.sequential  # noqa: F401  (every import the run needs, before the baseline)
    from transformers import LlamaForCausalLM  # noqa: F401

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context belongs to the baseline, not to the run
        torch.cuda.reset_peak_memory_stats(device)
    import gc

    gc.collect()
    rss_imports = _rss_now() if reset_peak_rss() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    vocab = SHAPES[shape][6]
    calib = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    refit = {} if refit_samples is None else {"refit_samples": refit_samples}
    config = PruneConfig(ratio=0.25, calib_samples=samples, calib_seq_len=seq_len, **refit, **METHODS[method])
    refit_ids = torch.randint(0, vocab, (config.refit_samples, config.refit_seq_len),
                              generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    folder_out, result = prune_checkpoint(folder, config, out, dtype=torch.bfloat16, calib_ids=calib,
                                          refit_ids=refit_ids, device=device, progress=False)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    report = result.report
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "peak_device_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
        "peak_rss_bytes": peak_rss(),
        "rss_after_imports_bytes": rss_imports,
        "rss_at_end_bytes": _rss_now(),
        "seconds": seconds,
        "layers": report["sequential"]["layers"],
        "timings": report["timings"],
        "method": method,
        "config": report["config"] if "config" in report else None,
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
    ap.add_argument("--shape", choices=sorted(SHAPES), default=DEFAULT_SHAPE,
                    help=f"shapes of the random checkpoint (default: {DEFAULT_SHAPE}; tiny: a toy for dry runs)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the checkpoint (default: the shape's)")
    ap.add_argument("--device", default="cpu", help="where the layers run: cpu, cuda, cuda:N (default: cpu)")
    ap.add_argument("--method", choices=sorted(METHODS), default=DEFAULT_METHOD,
                    help=f"what the run prunes with (default: {DEFAULT_METHOD}: Block Influence, Wanda, no refit)")
    ap.add_argument("--refit-samples", type=int, default=None, help="refit windows of 256 tokens (default: the config's)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="prune this checkpoint (written earlier with --keep) instead of writing one")
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--calib-seq-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the pruning run (default: 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint goes (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the pruned folder")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    measured = args.shape
    layers_measured = SHAPES[measured][0] if args.layers is None else args.layers
    if layers_measured < 2:
        ap.error("--layers: at least 2 (with one layer the embeddings leave less than 25% to remove)")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        ap.error(f"--device: cpu or cuda[:N], got {args.device!r}")
    if args.child:
        result = child(Path(args.child[0]), Path(args.child[1]), args.calib_samples, args.calib_seq_len, args.threads,
                       shape=measured, device=args.device, method=args.method, refit_samples=args.refit_samples)
        print(json.dumps(result))
        return 0
    cuda = args.device.startswith("cuda")
    if cuda:
        import torch

        if not torch.cuda.is_available():
            print(f"bench_sequential: --device {args.device}, but no CUDA device is visible", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="bench-sequential-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        checkpoint = work / "checkpoint" if args.checkpoint is None else args.checkpoint
        if args.checkpoint is None:
            ckpt_bytes = write_checkpoint(checkpoint, layers_measured, measured, args.device if cuda else "cpu")
        else:
            ckpt_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        write_seconds = time.perf_counter() - t0
        print(f"checkpoint: {measured} shapes, {layers_measured} layers, bfloat16, {ckpt_bytes / GB:.2f} GB "
              f"(written in {write_seconds:.0f} s to {work})", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "RAYON_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "--child", str(checkpoint), str(work / "pruned"), "--method", args.method,
               *(["--refit-samples", str(args.refit_samples)] if args.refit_samples else []),
               "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
               "--threads", str(args.threads), "--shape", measured, "--layers", str(layers_measured),
               "--device", args.device]
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
    if not per_pass["importance"]:  # one pass (uniform, depth)
        per_pass["importance"] = [0.0] * len(per_pass["prune"])
    seconds_per_layer = [a + b for a, b in zip(per_pass["importance"], per_pass["prune"])]
    where = f"on {r['device_name']}" if cuda else f"on the CPU, {args.threads} thread(s)"
    print(f"\npruned 25% layer by layer (--method {args.method}: {METHODS[args.method] or 'the defaults'}; {args.calib_samples} x "
          f"{args.calib_seq_len} calibration tokens; {where}) in {r['seconds']:.1f} s; "
          f"actual ratio {r['actual_ratio']:.4f}")
    print("\nlayer | importance pass (s) | prune + write pass (s) | both (s)")
    for l, (a, b) in enumerate(zip(per_pass["importance"], per_pass["prune"])):
        print(f"{l:5d} | {a:19.2f} | {b:22.2f} | {a + b:8.2f}")
    print(f"\nimportance pass per layer: {_stats(per_pass['importance'])}")
    print(f"prune pass per layer:      {_stats(per_pass['prune'])}")
    print("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))

    peak, base = r["peak_rss_bytes"], r["rss_after_imports_bytes"]
    layer_bytes = r["max_layer_bytes"]
    print(f"\npeak RSS {peak / GB:.2f} GB = {peak / ckpt_bytes:.3f} x the checkpoint's {ckpt_bytes / GB:.2f} GB "
          f"(goal: at most 0.25 x); the imports alone (torch, transformers, layerprune"
          f"{', the CUDA context' if cuda else ''}) {base / GB:.2f} GB, so the run adds {(peak - base) / GB:.2f} GB "
          f"= {(peak - base) / layer_bytes:.2f} layers of {layer_bytes / GB:.3f} GB")
    peak_device = r.get("peak_device_bytes")
    if peak_device is not None:
        print(f"peak device memory (torch.cuda.max_memory_allocated) {peak_device / GB:.3f} GB = "
              f"{peak_device / layer_bytes:.2f} layers (reserved {r['peak_device_reserved_bytes'] / GB:.3f} GB)")

    # Projections: time per layer scales with the layer's parameters (its matmuls and its bytes read, at a
    # fixed number of calibration tokens); the memory above the imports with the two layers the engine holds.
    # Device memory: measured on CUDA, scaled by the layer's size; from a CPU run, the RSS the run adds.
    sec_layer = statistics.median(seconds_per_layer)
    extra_per_layer_byte = (peak - base) / layer_bytes
    device_per_layer_byte = extra_per_layer_byte if peak_device is None else peak_device / layer_bytes
    device_tag = "device GB (measured, scaled)" if peak_device is not None else "device GB (--device cuda, estimated)"
    print("\nshape                   | layers | layer GB | checkpoint GB | s / layer | total min | peak RSS GB | "
          f"RSS / checkpoint | {device_tag}")
    projections = {}
    rows = list(PROJECTED) + ([measured] if measured not in PROJECTED else [])
    for name in rows:
        is_measured = name == measured
        layers = SHAPES[name][0] if not is_measured else layers_measured
        scale = layer_params(name) / layer_params(measured)
        this_layer = layer_params(name) * DTYPE_BYTES
        ckpt = checkpoint_bytes(name) if not is_measured else ckpt_bytes
        rss = base + extra_per_layer_byte * this_layer if not is_measured else peak
        # on a GPU: the layer, its pruned copy and the activations move there
        device = device_per_layer_byte * this_layer if not (is_measured and peak_device is not None) else peak_device
        seconds = sec_layer * scale
        projections[name] = {"layers": layers, "layer_bytes": this_layer, "checkpoint_bytes": ckpt,
                             "seconds_per_layer": seconds, "total_seconds": seconds * layers, "peak_rss_bytes": rss,
                             "rss_over_checkpoint": rss / ckpt, "device_bytes": device,
                             "measured": is_measured}
        tag = " (measured)" if is_measured else ""
        print(f"{name + tag:23s} | {layers:6d} | {this_layer / GB:8.3f} | {ckpt / GB:13.1f} | {seconds:9.2f} | "
              f"{seconds * layers / 60:9.1f} | {rss / GB:11.2f} | {rss / ckpt:16.3f} | {device / GB:.1f}")
    big = projections["Llama-3-70B"]
    source = f"measured on {r['device_name']}" if cuda else "projected from this CPU run"
    print(f"\nLlama-3-70B with --device cuda holds about {big['device_bytes'] / GB:.1f} GB on the device (a layer "
          f"of {big['layer_bytes'] / GB:.2f} GB, its pruned copy and the activations): it fits on one 80 GB GPU "
          f"{'with room to spare' if big['device_bytes'] < 40 * GB else 'only just' if big['device_bytes'] < 80 * GB else 'NOT'}; "
          f"the host keeps about {big['peak_rss_bytes'] / GB:.1f} GB; {big['total_seconds'] / 60:.0f} min in all "
          f"({source}, scaled by the layer's size).")
    if args.json:
        write_json_atomic(args.json, {
            "command": [sys.executable, *sys.argv], "shape": measured, "device": args.device,
            "device_name": r["device_name"], "layers": layers_measured, "threads": args.threads,
            "calibration": [args.calib_samples, args.calib_seq_len],
            "peak_rss_bytes": peak, "checkpoint_bytes": ckpt_bytes, "rss_after_imports_bytes": base,
            "peak_rss_over_checkpoint": peak / ckpt_bytes, "peak_device_bytes": peak_device,
            "seconds_per_layer": seconds_per_layer, "seconds_per_layer_by_pass": per_pass,
            "write_checkpoint_seconds": write_seconds, "run": r, "projections": projections,
        })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
