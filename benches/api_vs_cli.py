"""The Python API and the CLI prune to the same model: SmolLM2-135M at --ratio, default method, both ways.

Runs `layerprune prune --model smollm2-135m --ratio R --data-dir D --out DIR/cli` in a child process, then
`layerprune.prune(model, tokenizer, PruneConfig(ratio=R, data_dir=D))` in this one, and prints whether they keep
the same KV heads and MLP channels in every layer and the PPL of both on the first --tokens WikiText-2 test tokens
(windows of 128). Never asserts; exits 1 when the kept units differ.

    python benches/api_vs_cli.py --data-dir ../shared/data/wikitext-2-raw [--ratio 0.25] [--tokens 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="folder for the CLI's output (default: a temporary folder)")
    args = p.parse_args(argv)

    import torch

    import layerprune
    from layerprune.data import eval_tokens
    from layerprune.evaluation import perplexity
    from layerprune.models import load_model, load_pruned

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="api_vs_cli-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "layerprune", "prune", "--model", "smollm2-135m", "--ratio",
                          str(args.ratio), "--data-dir", args.data_dir, "--out", str(out / "cli"), "--threads",
                          str(args.threads), "--no-progress"], capture_output=True, text=True)
    if cli.returncode != 0:
        print(cli.stderr[-3000:], file=sys.stderr)
        return 2
    cli_seconds = time.perf_counter() - t0
    cli_report = json.loads((out / "cli" / "report.json").read_text())

    model, tokenizer = load_model("smollm2-135m")
    t0 = time.perf_counter()
    result = layerprune.prune(model, tokenizer, layerprune.PruneConfig(ratio=args.ratio, data_dir=args.data_dir),
                              progress=False, inplace=True)
    api_seconds = time.perf_counter() - t0

    def kept(report: dict) -> list:
        return [(layer["kv_heads_kept"], layer["mlp_channels_kept"]) for layer in report["layers"]]

    same = kept(cli_report) == kept(result.report)
    tokens = eval_tokens(tokenizer, data_dir=args.data_dir, max_tokens=args.tokens)
    cli_model, _ = load_pruned(out / "cli")
    ppl_cli = perplexity(cli_model, tokens, seq_len=128, progress=False)["ppl"]
    ppl_api = perplexity(result.model, tokens, seq_len=128, progress=False)["ppl"]
    print(f"method: cli {cli_report['method']} / api {result.report['method']}")
    print(f"same kept KV heads and MLP channels in all {len(cli_report['layers'])} layers: {same}")
    print(f"params after: cli {cli_report['params_after']['total']:,} / api {result.report['params_after']['total']:,}")
    print(f"PPL on the first {tokens.numel():,} test tokens: cli {ppl_cli:.3f} / api {ppl_api:.3f}")
    print(f"prune time: cli {cli_seconds:.1f} s (process, load included) / api {api_seconds:.1f} s")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
