"""Healing SmolLM2 after pruning: perplexity against healing tokens, full against LoRA, the cached top-K teacher
against the live one, and tokens/s and peak memory against a plain transformers distillation loop.

Parts (each in a child process, so every peak RSS is its own; VmHWM is reset after the first optimizer step, so
the peak is the training's steady state, not a model load's):

* ``speed``: ``--speed-steps`` optimizer steps (8 x 256 tokens) of
  - ``plain``: the loop a user writes with transformers: student and teacher forward every step, full KL on the
    whole vocabulary through autograd, AdamW (the same betas, clipping and precision);
  - ``live``: `layerprune.heal` with the teacher run at every step;
  - ``cached``: `layerprune.heal` on the cached top-K teacher (the cache is filled first, not timed);
  - ``student``: the student alone (cross-entropy on the text, no teacher): the memory reference.
  Tokens/s are the median over the steps after the first.
* ``topk``: two runs of ``--topk-tokens`` from the same student, one on the cached top-64 teacher, one on the
  teacher's whole distribution (live, full KL): the gap the top-K costs, in held-out and test perplexity.
* ``tune``: the defaults chosen on held-out text. From the default config, one setting at a time: the peak
  learning rate (``--tune-lrs``), the cross-entropy weight (``--tune-ce-weights``: KL alone against CE + KL) and
  the teacher's top K (``--tune-top-ks``), each a run of ``--tune-tokens`` on the ``unbalanced`` student. Each
  prints its held-out perplexity and loss (the held-out slice of valid the run never trains on; the loss compares
  across learning rates only, since K and the CE weight change what it measures); the test perplexity is printed
  beside them and chooses nothing.
* ``curve``: for each of ``--methods`` (pruned at ``--ratio`` with `compare`'s settings; ``dense`` is the unpruned
  model trained the same way, with the text's cross-entropy, since its KL to itself is zero) and each of
  ``--modes`` (full, lora): one healing run of ``--tokens`` on WikiText-2 valid, and the README protocol's
  perplexity (first 32,768 test tokens, windows of 128) after 0 tokens and at every ``--points`` count. The test
  text is read only by these evaluations; no choice is made on it.

Writes ``--json`` and the plot ``--plot`` (perplexity against healing tokens, one line per method and mode, dense
as a reference). Never asserts.

    python benches/bench_heal.py [--parts speed,topk,tune,curve] [--methods unbalanced,uniform-obs,dense] [--modes full,lora]
        [--tokens 262144] [--points 32768,65536,131072,262144] [--precision bfloat16] [--workdir DIR] [--json OUT]
        [--plot PNG]
    python benches/bench_heal.py --replot A.json B.json --plot PNG
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benches"))

from bench_sequential import peak_rss, reset_peak_rss  # noqa: E402

from layerprune.atomic import write_json_atomic  # noqa: E402

MODEL = "smollm2-135m"
EVAL_TOKENS, EVAL_SEQ_LEN = 32_768, 128
SPEED_KINDS = ("plain", "live", "cached", "student")


def _data_dir(args: argparse.Namespace) -> str:
    return args.data_dir or os.environ.get("LAYERPRUNE_DATA_DIR") or str(ROOT.parent / "shared" / "data" / "wikitext-2-raw")


def _pruned_folder(args: argparse.Namespace, method: str) -> Path:
    """The model ``method`` gives at ``--ratio`` (compare's settings), saved once in the work folder."""
    import torch

    from layerprune.compare.settings import CompareSettings, prune_config
    from layerprune.export import save_pruned
    from layerprune.models import load_model
    from layerprune.pruning import prune

    folder = Path(args.workdir) / f"{method}-{args.ratio}"
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = load_model(MODEL, dtype=torch.float32)
    settings = CompareSettings(ratios=(args.ratio,), data_dir=_data_dir(args))
    config = prune_config(method, args.ratio, settings, model.config.num_hidden_layers)
    result = prune(model, tokenizer, config, progress=not args.no_progress, inplace=True)
    save_pruned(result.model, tokenizer, folder, report=result.report)
    return folder


def _heal_config(args: argparse.Namespace, **overrides):
    from layerprune.healing import HealConfig

    fields = dict(tokens=args.tokens, precision=args.precision, data_dir=_data_dir(args), seed=args.seed)
    fields.update(overrides)
    return HealConfig(**fields)


def _test_ppl(model, tokens) -> float:
    from layerprune.evaluation import perplexity

    was = model.training
    model.eval()
    ppl = perplexity(model, tokens, seq_len=EVAL_SEQ_LEN, progress=False)["ppl"]
    model.train(was)
    return float(ppl)


# ---- children ---------------------------------------------------------------------------------------------


def child_speed(args: argparse.Namespace) -> dict:
    import torch

    from layerprune.healing import heal, heal_text
    from layerprune.healing.losses import full_kl
    from layerprune.models import load_model

    torch.manual_seed(0)
    student, tokenizer = load_model(args.student)
    teacher_loader = lambda: load_model(MODEL)[0]  # noqa: E731
    kind, steps = args.kind, args.speed_steps
    # one more step than timed: the last step of a heal run ends with its held-out evaluation, which is not timed
    config = _heal_config(args, tokens=(steps + 1) * 8 * 256, eval_every=10**6,
                          teacher_logits="live" if kind == "live" else "cached")
    on_step = StepTimer()
    times = on_step.times

    if kind in ("live", "cached"):
        teacher = teacher_loader() if kind == "live" else teacher_loader
        heal(student, teacher, tokenizer, config, teacher_cache=args.teacher_cache, progress=False, inplace=True,
             on_step=on_step)
    else:
        text = heal_text(tokenizer, config.seq_len, config.held_out_fraction, config.dataset, config.data_dir)
        teacher = teacher_loader().eval() if kind == "plain" else None
        student.train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.peak_lr, betas=(0.9, 0.95))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bfloat16")
        order = torch.randperm(text.train.shape[0], generator=torch.Generator().manual_seed(0))
        for step in range(steps):
            ids = text.train[order[step * 8 : (step + 1) * 8]]
            optimizer.zero_grad()
            with autocast:
                logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
            if teacher is not None:
                with torch.no_grad(), autocast:
                    teacher_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
                loss = full_kl(logits, teacher_logits) / logits[..., 0].numel()
            else:
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            on_step(step + 1, (step + 1) * 2048, student)
    if kind in ("live", "cached"):
        times = times[:steps]  # the extra step (with the held-out evaluation) is dropped
    per_step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"kind": kind, "steps": steps, "step_seconds": times, "seconds_per_step": per_step,
            "tokens_per_second": 2048 / per_step,
            "peak_rss": peak_rss(), "precision": args.precision}


class StepTimer:
    """A ``heal`` ``on_step`` callback: the seconds of every step in ``times``; after step 1 the peak RSS is reset
    (steps 2.. are measured), and ``at_first(model)`` is called then if given."""

    def __init__(self, at_first=None) -> None:
        self.times: list[float] = []
        self.at_first = at_first
        self.last = time.perf_counter()

    def __call__(self, step: int, tokens: int, model) -> None:
        self.times.append(time.perf_counter() - self.last)
        if step == 1:
            if self.at_first is not None:
                self.at_first(model)
            reset_peak_rss()
        self.last = time.perf_counter()


def child_curve(args: argparse.Namespace) -> dict:
    import torch

    from layerprune.data import eval_tokens
    from layerprune.healing import heal
    from layerprune.models import load_model

    student, tokenizer = load_model(args.student)
    test = eval_tokens(tokenizer, data_dir=_data_dir(args), max_tokens=EVAL_TOKENS)
    points = {int(p) for p in args.points.split(",")}
    curve = [{"tokens": 0, "ppl": _test_ppl(student, test)}]
    print(f"[bench_heal] {args.method}/{args.mode}: 0 tokens: PPL {curve[0]['ppl']:.2f}", file=sys.stderr, flush=True)

    def on_step(step: int, tokens: int, model) -> None:
        if tokens in points:
            curve.append({"tokens": tokens, "ppl": _test_ppl(model, test)})
            print(f"[bench_heal] {args.method}/{args.mode}: {tokens} tokens: PPL {curve[-1]['ppl']:.2f}",
                  file=sys.stderr, flush=True)

    overrides = {"lora": args.mode == "lora"}
    if args.method == "dense":
        overrides["ce_weight"] = 1.0
    config = _heal_config(args, **overrides)
    t0 = time.perf_counter()
    result = heal(student, lambda: load_model(MODEL)[0], tokenizer, config, teacher_cache=args.teacher_cache,
                  progress=not args.no_progress, inplace=True, on_step=on_step)
    h = result.report["heal"]
    return {"method": args.method, "mode": args.mode, "curve": curve, "peak_lr": h["peak_lr"],
            "tokens_per_second": h["tokens_per_second"],
            "train_seconds": h["train_seconds"], "seconds": time.perf_counter() - t0,
            "held_out": h["history"]["held_out"], "config": h["config"], "peak_rss": peak_rss(),
            "trainable_parameters": h["trainable_parameters"], "torch_threads": torch.get_num_threads()}


def child_topk(args: argparse.Namespace) -> dict:
    """One short run with the teacher's top-K (cached) or its whole distribution (live, K = vocabulary)."""
    from layerprune.data import eval_tokens
    from layerprune.healing import heal
    from layerprune.models import load_model

    student, tokenizer = load_model(args.student)
    test = eval_tokens(tokenizer, data_dir=_data_dir(args), max_tokens=EVAL_TOKENS)
    full = args.top_k >= student.config.vocab_size
    # float32 in both runs: the live teacher runs in the student's precision, the cache is filled in float32
    config = _heal_config(args, tokens=args.topk_tokens, top_k=args.top_k, teacher_logits="live" if full else "cached",
                          precision="float32")
    teacher = load_model(MODEL)[0] if full else (lambda: load_model(MODEL)[0])
    result = heal(student, teacher, tokenizer, config, teacher_cache=None if full else args.teacher_cache,
                  progress=not args.no_progress, inplace=True)
    h = result.report["heal"]
    return {"top_k": args.top_k, "full": full, "tokens": h["tokens"], "held_out_after": h["held_out_after"],
            "test_ppl": _test_ppl(result.model, test), "tokens_per_second": h["tokens_per_second"]}


def child_tune(args: argparse.Namespace) -> dict:
    """One run of ``--tune-tokens`` with the default config changed by ``--overrides`` (JSON)."""
    from layerprune.data import eval_tokens
    from layerprune.healing import heal
    from layerprune.models import load_model

    overrides = json.loads(args.overrides)
    student, tokenizer = load_model(args.student)
    test = eval_tokens(tokenizer, data_dir=_data_dir(args), max_tokens=EVAL_TOKENS)
    config = _heal_config(args, tokens=args.tune_tokens, **overrides)
    cache = f"{args.teacher_cache}-k{config.top_k}"
    result = heal(student, lambda: load_model(MODEL)[0], tokenizer, config, teacher_cache=cache,
                  progress=not args.no_progress, inplace=True)
    h = result.report["heal"]
    return {"overrides": overrides, "tokens": h["tokens"], "held_out_before": h["held_out_before"],
            "held_out_after": h["held_out_after"], "test_ppl": _test_ppl(result.model, test),
            "tokens_per_second": h["tokens_per_second"], "config": h["config"]}


TUNED = (("lr", "tune_lrs", float), ("ce_weight", "tune_ce_weights", float), ("top_k", "tune_top_ks", int))


# ---- the parent -------------------------------------------------------------------------------------------


def _run_child(args: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(args.workdir) / f"child-{os.getpid()}-{time.monotonic_ns()}.json"
    argv = [sys.executable, __file__, "--child", str(out), "--workdir", args.workdir, "--precision", args.precision,
            "--tokens", str(args.tokens), "--points", args.points, "--speed-steps", str(args.speed_steps),
            "--seed", str(args.seed), "--data-dir", _data_dir(args), "--topk-tokens", str(args.topk_tokens),
            "--tune-tokens", str(args.tune_tokens), *(["--no-progress"] if args.no_progress else []),
            *extra]
    subprocess.run(argv, check=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def plot(results: dict, path: Path) -> None:
    from layerprune.report.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run in results.get("curve", []):
        xs, ys = [p["tokens"] for p in run["curve"]], [p["ppl"] for p in run["curve"]]
        style = ":" if run["method"] == "dense" else ("--" if run["mode"] == "lora" else "-")
        lr = run.get("peak_lr") or run["config"].get("lr")  # None: runs from before it was recorded (1e-4 full)
        mode = f"{run['mode']}, lr {lr:g}" if lr else run["mode"]
        label = f"{run['method']} ({mode})" if run["method"] != "dense" else f"dense + heal ({mode}, CE)"
        ax.plot(xs, ys, "o" + style, label=label, markersize=4)
    if results.get("dense_ppl"):
        ax.axhline(results["dense_ppl"], color="gray", linestyle=":", label=f"dense ({results['dense_ppl']:.2f})")
    ax.set_xlabel("healing tokens (WikiText-2 valid)")
    ax.set_ylabel(f"perplexity (first {EVAL_TOKENS:,} test tokens, windows of {EVAL_SEQ_LEN})")
    ax.set_xscale("symlog", linthresh=32768)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="speed,curve")
    p.add_argument("--methods", default="unbalanced,uniform-obs,dense")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--speed-kinds", default=",".join(SPEED_KINDS))
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--points", default="32768,65536,131072,262144")
    p.add_argument("--speed-steps", type=int, default=4)
    p.add_argument("--precision", default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--workdir", default="/tmp/bench_heal")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    p.add_argument("--student", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--teacher-cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--top-k", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--topk-tokens", type=int, default=32_768, help="healing tokens of the top-K against full-KL runs")
    p.add_argument("--tune-tokens", type=int, default=32_768, help="healing tokens of each tuning run")
    p.add_argument("--tune-lrs", default="5e-5,1e-4,2e-4,4e-4")
    p.add_argument("--tune-ce-weights", default="0,1")
    p.add_argument("--tune-top-ks", default="16,64,256")
    p.add_argument("--overrides", default=None, help=argparse.SUPPRESS)
    p.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                   help="draw --plot from the curves of these result files (no run)")
    args = p.parse_args()
    if args.replot:
        merged: dict = {"curve": []}
        for path in args.replot:
            loaded = json.loads(Path(path).read_text())
            merged["curve"] += loaded.get("curve", [])
            merged["dense_ppl"] = loaded.get("dense_ppl", merged.get("dense_ppl"))
        plot(merged, Path(args.plot or "heal.png"))
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.child:
        result = (child_speed(args) if args.kind else child_tune(args) if args.overrides else
                  child_topk(args) if args.top_k else child_curve(args))
        write_json_atomic(args.child, result)
        return
    import torch

    from layerprune.data import eval_tokens
    from layerprune.models import load_model

    cache = str(Path(args.workdir) / "teacher-cache")
    results: dict = {"date": time.strftime("%Y-%m-%d"), "model": MODEL, "ratio": args.ratio, "tokens": args.tokens,
                     "precision": args.precision, "torch_threads": torch.get_num_threads(), "speed": [], "curve": []}
    dense, tokenizer = load_model(MODEL)
    results["dense_ppl"] = _test_ppl(dense, eval_tokens(tokenizer, data_dir=_data_dir(args), max_tokens=EVAL_TOKENS))
    del dense
    parts = args.parts.split(",")
    if "speed" in parts:
        student = str(_pruned_folder(args, "unbalanced"))
        for kind in args.speed_kinds.split(","):
            run = _run_child(args, ["--kind", kind, "--student", student, "--teacher-cache", cache])
            results["speed"].append(run)
            print(f"speed {kind}: {run['tokens_per_second']:.1f} tokens/s, peak RSS {run['peak_rss'] / 2**30:.2f} GiB",
                  flush=True)
            if args.json:
                write_json_atomic(args.json, results)
    if "topk" in parts:
        student = str(_pruned_folder(args, "unbalanced"))
        results["topk"] = []
        for k in (64, 10**9):
            run = _run_child(args, ["--top-k", str(k), "--student", student, "--teacher-cache", cache])
            results["topk"].append(run)
            print(f"top-k {'full' if run['full'] else k}: held-out PPL {run['held_out_after']['ppl']:.2f}, test PPL "
                  f"{run['test_ppl']:.2f}, {run['tokens_per_second']:.1f} tokens/s", flush=True)
            if args.json:
                write_json_atomic(args.json, results)
    if "tune" in parts:
        from layerprune.healing import HealConfig

        student, default = str(_pruned_folder(args, "unbalanced")), HealConfig()
        results["tune"] = {"tokens": args.tune_tokens, "runs": [], "chosen": {}}
        done: dict[str, dict] = {}
        for field, flag, kind in TUNED:
            values = [kind(v) for v in getattr(args, flag).split(",")]
            runs = []
            for value in values:
                key = "default" if value == getattr(default, field) or (field == "lr" and value == default.peak_lr) \
                    else f"{field}={value}"
                if key not in done:
                    overrides = {} if key == "default" else {field: value}
                    done[key] = _run_child(args, ["--overrides", json.dumps(overrides), "--student", student,
                                                  "--teacher-cache", cache])
                    results["tune"]["runs"].append(done[key])
                run = done[key]
                runs.append((value, run))
                print(f"tune {field}={value}: held-out PPL {run['held_out_after']['ppl']:.3f} (KL "
                      f"{run['held_out_after']['kl']:.4f}), test PPL {run['test_ppl']:.2f}", flush=True)
            best = min(runs, key=lambda vr: vr[1]["held_out_after"]["ppl"])[0]
            results["tune"]["chosen"][field] = best
            print(f"tune {field}: lowest held-out perplexity at {best}", flush=True)
            if field == "lr":  # the same loss at every learning rate: its held-out value compares too
                by_loss = min(runs, key=lambda vr: vr[1]["held_out_after"]["loss"])[0]
                results["tune"].setdefault("chosen_by_held_out_loss", {})[field] = by_loss
                print(f"tune {field}: lowest held-out loss (the training objective) at {by_loss}", flush=True)
            if args.json:
                write_json_atomic(args.json, results)
    if "curve" in parts:
        for method in args.methods.split(","):
            student = MODEL if method == "dense" else str(_pruned_folder(args, method))
            for mode in args.modes.split(","):
                run = _run_child(args, ["--method", method, "--mode", mode, "--student", student,
                                        "--teacher-cache", cache])
                results["curve"].append(run)
                print(f"curve {method}/{mode}: " + ", ".join(f"{q['tokens']}: {q['ppl']:.2f}" for q in run["curve"]),
                      flush=True)
                if args.json:
                    write_json_atomic(args.json, results)
    by_kind = {r["kind"]: r for r in results["speed"]}
    if {"plain", "cached", "student"} <= set(by_kind):
        results["speed_ratio_cached_vs_plain"] = by_kind["cached"]["tokens_per_second"] / by_kind["plain"]["tokens_per_second"]
        results["memory_ratio_cached_vs_student"] = by_kind["cached"]["peak_rss"] / by_kind["student"]["peak_rss"]
        print(f"cached vs plain: {results['speed_ratio_cached_vs_plain']:.2f}x tokens/s; peak memory cached / student "
              f"alone: {results['memory_ratio_cached_vs_student']:.2f}x", flush=True)
    if args.json:
        write_json_atomic(args.json, results)
    if args.plot and results["curve"]:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
