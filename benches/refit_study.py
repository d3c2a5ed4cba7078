"""Which refit to make the default, chosen on validation text, then measured on the README's protocol.

1. Layer importance once: sensitivity curves measured after the refit (refit statistics: 32 x 256 tokens).
2. Screening at ratio 0.25 on the first 8,192 tokens of WikiText-2 *valid* (never test): refit variants.
3. The chosen variant, `uniform` + the same refit and `flap`, at 0.20 and 0.25 on the first 32,768 *test* tokens.

    .venv/bin/python benches/refit_study.py --data-dir ../shared/data/wikitext-2-raw --out runs/refit_study.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from layerprune.atomic import write_json_atomic
from layerprune.data import calibration_batch, eval_tokens
from layerprune.evaluation import perplexity
from layerprune.models import load_model
from layerprune.pruning import PruneConfig, pipeline


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--valid-tokens", type=int, default=8192)
    p.add_argument("--test-tokens", type=int, default=32768)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    calib = calibration_batch(tok, 10, 64, 0, "wikitext2", args.data_dir)
    valid = eval_tokens(tok, "wikitext2", args.data_dir, "valid", args.valid_tokens)
    test = eval_tokens(tok, "wikitext2", args.data_dir, "test", args.test_tokens)
    rows: list[dict] = []
    out: dict = {"rows": rows}

    def refit_ids(samples: int, seq_len: int = 256) -> torch.Tensor:
        return calibration_batch(tok, samples, seq_len, 1, "wikitext2", args.data_dir)

    def run(name, config, li, ids, tokens, split):
        t0 = time.perf_counter()
        result = pipeline.prune(model, tok, config, layer_importance=li, calib_ids=calib, refit_ids=ids, progress=False)
        seconds = time.perf_counter() - t0
        ppl = perplexity(result.model, tokens, seq_len=128, progress=False)["ppl"]
        row = {"name": name, "split": split, "ratio": config.ratio, "ppl": ppl, "params": result.allocation.params_after,
               "prune_seconds": seconds, "refit_seconds": result.report["timings"].get("refit"),
               "refit_tokens": None if ids is None else int(ids.numel())}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json_atomic(args.out, out)
        return ppl

    t0 = time.perf_counter()
    base = PruneConfig(ratio=0.25, mode="unbalanced", solver="dp", layer_importance="sensitivity", importance="taylor", refit="lstsq",
                       data_dir=args.data_dir)
    li = pipeline.measure_layer_importance(model, calib, base, progress=False, refit_ids=refit_ids(32))
    out["layer_importance_seconds"] = time.perf_counter() - t0
    print(f"layer importance (curves after the refit): {out['layer_importance_seconds']:.0f} s", flush=True)
    variants = {
        "lstsq, 32x256": (dict(refit="lstsq"), 32),
        "lstsq, 128x256": (dict(refit="lstsq"), 128),
        "lstsq-bias, 128x256": (dict(refit="lstsq-bias"), 128),
        "lstsq, no error correction, 128x256": (dict(refit="lstsq", refit_error_correction=False), 128),
    }
    screened = {}
    for name, (change, samples) in variants.items():
        config = PruneConfig(**{**base.to_json(), **change, "protected": tuple(base.protected)})
        screened[name] = run(f"unbalanced-refit ({name})", config, li, refit_ids(samples), valid, "valid")
    best = min(screened, key=screened.get)
    out["chosen_on_valid"] = best
    print(f"chosen on valid: {best}", flush=True)
    change, samples = variants[best]
    ids = refit_ids(samples)
    for ratio in (0.2, 0.25):
        unbalanced = PruneConfig(**{**base.to_json(), **change, "ratio": ratio, "protected": ()})
        run(f"unbalanced-refit ({best})", unbalanced, li, ids, test, "test")
        uniform = PruneConfig(ratio=ratio, mode="uniform", match_params=True, importance="taylor",
                               data_dir=args.data_dir, **change)
        run(f"uniform-refit ({best})", uniform, None, ids, test, "test")
        flap = PruneConfig(ratio=ratio, mode="flap", refit="bias", refit_error_correction=False, data_dir=args.data_dir)
        run("flap", flap, None, ids, test, "test")
    write_json_atomic(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
