"""Per-rank memory and speed of healing under torchrun: data parallel against FSDP2 (`layerprune heal --fsdp`).

The student is SmolLM2-135M pruned at ``--ratio`` by `unbalanced` (bench_heal.py's folder, made if missing), healed
for ``--steps`` optimizer steps of 8 × 256 tokens on the cached top-64 teacher (filled first, not measured), in
bfloat16 autocast, in three launches:

* ``one``: one process;
* ``dp-2``: torchrun, 2 ranks (gloo), each with the whole model, its gradients and AdamW's moments;
* ``fsdp-2``: the same with ``--fsdp``: each rank holds half of the decoder layers' weights, gradients and moments,
  plus the unsharded model it started from (the healed weights are copied back into it at the end).

Per rank: the peak RSS of the steady state (VmHWM reset after the first step), the bytes of trainable tensors
and AdamW state the rank holds (its shards), and tokens/s (median over the steps after the first). On one CPU the
ranks share 2 cores, so tokens/s says what the collectives cost here, not what N devices would give. Never asserts.

    python benches/bench_heal_fsdp.py [--steps 4] [--ratio 0.25] [--workdir /tmp/bench_heal] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

import bench_heal  # noqa: E402
from bench_sequential import peak_rss  # noqa: E402

from layerprune.atomic import write_json_atomic  # noqa: E402

MODEL = "smollm2-135m"
TOKENS_PER_STEP = 8 * 256


def _held_bytes(model) -> int:
    """Bytes of this rank's local parameter tensors (its shards where sharded)."""
    from layerprune.healing.sharding import is_sharded

    return sum((p.to_local() if is_sharded(p) else p).numel() * p.element_size() for p in model.parameters())


def rank_main(args: argparse.Namespace) -> None:
    """One rank (or the one process): heal ``--steps`` steps and write this rank's figures."""
    import torch

    from layerprune import distributed
    from layerprune.healing import HealConfig, heal
    from layerprune.models import load_model

    if args.world > 1 or args.fsdp:
        distributed.initialize("gloo")
    student, tokenizer = load_model(args.student)
    config = HealConfig(tokens=(args.steps + 1) * TOKENS_PER_STEP, precision="bfloat16", eval_every=10**6,
                        fsdp=args.fsdp, data_dir=args.data_dir)
    held: list[int] = []
    on_step = bench_heal.StepTimer(at_first=lambda model: held.append(_held_bytes(model)))
    times = on_step.times

    heal(student, lambda: load_model(MODEL)[0], tokenizer, config, teacher_cache=args.teacher_cache, progress=False,
         inplace=True, on_step=on_step)
    steps = times[: args.steps]  # the last step ends with the held-out evaluation, not timed
    per_step = statistics.median(steps[1:])
    out = {"rank": distributed.rank(), "world": distributed.world_size(), "fsdp": args.fsdp,
           "peak_rss": peak_rss(), "parameter_bytes": held[0] if held else None, "step_seconds": steps,
           "tokens_per_second": TOKENS_PER_STEP / per_step, "threads": torch.get_num_threads()}
    write_json_atomic(Path(args.out) / f"rank{distributed.rank()}.json", out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: argparse.Namespace, name: str, world: int, fsdp: bool, student: str, cache: str) -> list[dict]:
    out = Path(args.workdir) / f"fsdp-{name}"
    out.mkdir(parents=True, exist_ok=True)
    target = [__file__, "--rank-main", "--student", student, "--teacher-cache", cache, "--steps", str(args.steps),
              "--data-dir", args.data_dir, "--out", str(out), "--world", str(world), *(["--fsdp"] if fsdp else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // world)), "GLOO_SOCKET_IFNAME": "lo"}
    if world == 1:
        cmd = [sys.executable, *target]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), *target]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--workdir", default="/tmp/bench_heal")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--student", default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher-cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data_dir = args.data_dir or os.environ.get("LAYERPRUNE_DATA_DIR") or str(ROOT.parent / "shared" / "data" / "wikitext-2-raw")
    if args.rank_main:
        rank_main(args)
        return
    student = str(bench_heal._pruned_folder(argparse.Namespace(workdir=args.workdir, ratio=args.ratio,
                                                               data_dir=args.data_dir, no_progress=True),
                                            "unbalanced"))
    cache = str(Path(args.workdir) / "teacher-cache")
    results = {"date": time.strftime("%Y-%m-%d"), "model": MODEL, "ratio": args.ratio, "steps": args.steps,
               "runs": {}}
    for name, world, fsdp in (("one", 1, False), ("dp-2", 2, False), ("fsdp-2", 2, True)):
        ranks = launch(args, name, world, fsdp, student, cache)
        results["runs"][name] = ranks
        print(f"{name}: " + "; ".join(f"rank {r['rank']}: peak RSS {r['peak_rss'] / 2**30:.2f} GiB, parameters held "
                                      f"{r['parameter_bytes'] / 2**20:.0f} MiB, {r['tokens_per_second']:.0f} tokens/s"
                                      for r in ranks), flush=True)
        if args.json:
            write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
