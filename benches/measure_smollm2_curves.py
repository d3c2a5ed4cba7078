"""Measure SmolLM2-135M's per-layer sensitivity curves with `prune` and save them as an allocation spec.

Runs ``layerprune.pruning.prune`` once (``--mode unbalanced --layer-importance sensitivity --solver dp``,
calibration: 10 x 64 tokens of the WikiText-2 validation split, seed 0) and writes the allocation problem it
solved, measured curves included, as a spec JSON that ``layerprune allocate --spec`` reads. It is the source of
the ``smollm2-measured`` instances of ``bench_solvers.py`` (``benches/instances/source/``).

    python benches/measure_smollm2_curves.py --data-dir ../shared/data/wikitext-2-raw \
        [--out benches/instances/source/smollm2-135m-sensitivity.json] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from layerprune.allocation import spec_to_json
from layerprune.arch import decoder_layers
from layerprune.atomic import json_safe, write_text_atomic
from layerprune.models import load_model
from layerprune.provenance import command_line, versions
from layerprune.pruning.config import PruneConfig
from layerprune.pruning.pipeline import build_allocation_spec, prune

DEFAULT_OUT = Path(__file__).resolve().parent / "instances" / "source" / "smollm2-135m-sensitivity.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="WikiText-2 raw folder (valid.txt is the calibration split)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"spec JSON to write (default: {DEFAULT_OUT})")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    ap.add_argument("--mlp-step", type=int, default=1, help="MLP grid step of the curves (default: 1, as compare)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    config = PruneConfig(ratio=0.25, mode="unbalanced", solver="dp", layer_importance="sensitivity", importance="taylor",
                         refit="none", mlp_step=args.mlp_step, data_dir=args.data_dir, seed=0)
    result = prune(model, tokenizer, config, progress=False)
    spec = build_allocation_spec(model.config, config, result.layer_importance, len(decoder_layers(model)))
    data = spec_to_json(spec)
    data["meta"] = {
        "source": "layerprune.pruning.prune on SmolLM2-135M-Instruct: sensitivity curves (calibration loss increase "
                  "when only one layer is pruned), WikiText-2 validation, 10 x 64 tokens, seed 0",
        "config": config.to_json(),
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.perf_counter() - start, 1),
        "command": command_line(),
        "versions": versions(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(args.out), json.dumps(json_safe(data), allow_nan=False) + "\n")  # compact: about 1 MB
    print(f"wrote {args.out}: {len(spec.layers)} layers, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
