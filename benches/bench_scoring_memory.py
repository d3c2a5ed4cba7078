"""Peak memory of Taylor scoring with and without the GradientScorer hooks.

Each mode runs in its own subprocess. Two peaks, both over the memory after loading the model:

* tensors: the most bytes held by torch tensors at once (CUDA: torch.cuda.max_memory_allocated;
  CPU: every allocation and free recorded by torch.profiler's memory events, replayed in order);
* RSS (CPU only): ru_maxrss, which also counts the code pages of torch's libraries touched for
  the first time by the backward pass and the heap glibc keeps after frees.

Modes:

* plain: one backward keeping every gradient, then `weight_scores(W, W.grad)` per layer
  (LLM-Pruner / TP style: weights + activations + ALL gradients);
* hooks: the same backward inside `GradientScorer(free_grads=True)`: each gradient is scored
  and dropped as soon as it is ready (weights + activations + the largest gradients in flight).

Only the scored weights (every nn.Linear in model.model.layers) require grad in both modes.
Inputs are random token ids (memory does not depend on the text). Never asserts.

    python benches/bench_scoring_memory.py [--model smollm2-135m|PATH|random] [--tokens 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from layerprune.atomic import write_json_atomic  # noqa: E402


def _random_smollm2_shape():
    """A randomly initialised model with SmolLM2-135M's shape (the fallback when none loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), "random (SmolLM2-135M shape)"


def _load(model_arg: str, device: str):
    import torch

    if model_arg != "random":
        try:
            from layerprune.models import load_model

            model, _ = load_model(model_arg, dtype=torch.float32, device=device, require_tokenizer=False)
            return model, model_arg
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the random model
            print(f"[memory] could not load {model_arg!r} ({type(exc).__name__}: {exc}); using a random model", file=sys.stderr)
    model, label = _random_smollm2_shape()
    return model.to(device), label


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _cpu_tensor_peak(fn) -> int:
    """Most bytes held by CPU tensors at once while `fn` runs, over what was held before it."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def child(mode: str, model_arg: str, tokens: int, device: str) -> dict:
    import torch

    from layerprune.scoring import GradientScorer, weight_scores

    torch.manual_seed(0)
    model, label = _load(model_arg, device)
    model.config.use_cache = False
    layers = model.model.layers
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(m is x for x in layers.modules())}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    seq = min(tokens, 128)
    ids = torch.randint(0, model.config.vocab_size, (max(1, tokens // seq), seq), device=device)
    scores = {}

    def score() -> None:
        if mode == "plain":
            model(ids, labels=ids).loss.backward()
            for n, m in targets.items():
                scores[n] = weight_scores(m.weight.detach(), m.weight.grad, kind="taylor", axis=0)
        else:
            with GradientScorer(model, kinds=("taylor",)) as scorer:
                model(ids, labels=ids).loss.backward()
            for n in targets:
                scores[n] = scorer.row_scores(n)

    t0 = time.perf_counter()
    rss_peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        score()
        torch.cuda.synchronize()
        tensor_peak = torch.cuda.max_memory_allocated() - base
    else:
        rss_base = _rss_peak_bytes()
        tensor_peak = _cpu_tensor_peak(score)
        rss_peak = _rss_peak_bytes() - rss_base
    seconds = time.perf_counter() - t0
    grad_bytes = sum(m.weight.numel() * m.weight.element_size() for m in targets.values())
    return {
        "mode": mode,
        "model": label,
        "device": device,
        "tokens": int(ids.numel()),
        "peak_tensors_over_loaded_mib": round(tensor_peak / 2**20, 3),
        "peak_rss_over_loaded_mib": None if rss_peak is None else round(rss_peak / 2**20, 3),
        "all_scored_grads_mib": round(grad_bytes / 2**20, 3),
        "seconds": round(seconds, 2),
        "checksum": float(sum(s.double().sum() for s in scores.values())),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="registry name, local HF folder, or 'random'")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["plain", "hooks"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.child:
        print(json.dumps(child(args.child, args.model, args.tokens, device)))
        return 0
    rows = []
    for mode in ("plain", "hooks"):
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--tokens", str(args.tokens), "--device", device]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            return res.returncode
        sys.stderr.write("".join(line + "\n" for line in res.stderr.splitlines() if line.startswith("[memory]")))
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        rss = "" if r["peak_rss_over_loaded_mib"] is None else f", RSS {r['peak_rss_over_loaded_mib']:7.1f} MiB"
        print(f"{mode:6s} {r['model']:30s} {r['device']:4s} tokens={r['tokens']:<5d} peak over loaded: tensors "
              f"{r['peak_tensors_over_loaded_mib']:7.1f} MiB{rss} (all scored grads: {r['all_scored_grads_mib']:.1f} MiB) "
              f"{r['seconds']:.1f} s", flush=True)
    rel = abs(rows[0]["checksum"] - rows[1]["checksum"]) / max(abs(rows[0]["checksum"]), 1e-30)
    print(f"scores agree between modes: relative checksum difference {rel:.2e}")
    if args.json:
        write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
