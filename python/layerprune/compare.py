"""`layerprune compare`: uniform vs unbalanced structured pruning on equal terms.

For each target ratio R (fraction of ALL parameters removed) the same dense model is pruned by

* ``uniform-range``: LLM-Pruner's ``llama3.py`` block-wise setting: one per-layer rate for the layers
  in ``[3, L-1)`` (its defaults ``block_{attention,mlp}_layer_start=3``, ``..._end=31`` on a 32-layer
  Llama: the first three layers and the last one are kept), KV groups and channels removed
  ``floor(rate * n)``. The rate is chosen by bisection on the parameter count alone (no data) so the
  whole model lands as close as possible to R; the ratio really achieved is reported.
* ``uniform``: one rate for every layer, matched to the exact parameter budget ``R * total``.
* ``unbalanced-seed``: the reference mapping: layer importance by removal, inverse mapping to
  per-layer rates, minimum effective rate 0.15 (ratio achieved reported as is).
* ``unbalanced``: sensitivity curves + the exact dynamic-programming allocation at the same budget.

Each model is evaluated on the SAME WikiText-2 test tokens (non-overlapping windows), saved with
`save_pruned` (its safetensors size is reported), timed (forward tokens/s) and asked for greedy
continuations of fixed prompts. Layer importance is computed once per model and method, cached in
``DIR/layer_importance/`` and reused by every method and ratio. Every finished run is persisted at
once to ``DIR/runs/<ratio>/<method>.json`` (temp + rename) and reused when the command is re-run
with the same settings, so an interrupted comparison resumes where it stopped. Everything that
chooses (importance, scores, allocation) uses calibration data only; the test split is only read by
the evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerprune import plots
from layerprune import report as report_mod
from layerprune.errors import InfeasibleError, InvalidInputError

METHODS = ("dense", "uniform-range", "uniform", "unbalanced-seed", "unbalanced")
PRUNED_METHODS = METHODS[1:]
# LLM-Pruner llama3.py: block_*_layer_start=3, block_*_layer_end=31 for 32 layers -> [3, L-1)
REFERENCE_RANGE_START = 3
REFERENCE_RANGE_END_FROM_LAST = 1
SEED_MIN_EFFECTIVE_RATE = 0.15
DEFAULT_MAX_TOKENS = 32768
DEFAULT_PROMPTS = (
    "The capital of France is",
    "In 1969, the first person to walk on the Moon was",
    "The three primary colors are",
    "Robert Boulter is an English film, television and theatre actor. He",
)
METHOD_NOTES = {
    "dense": "the unpruned model.",
    "uniform-range": (
        "LLM-Pruner llama3.py block-wise setting: one rate for layers [3, L-1) (first three and last layer kept), "
        "floor(rate * n) KV groups / channels removed per layer; rate chosen by bisection on the parameter count "
        "so the model lands closest to the target ratio (achieved ratio reported)."
    ),
    "uniform": "one rate for every layer, matched to the exact parameter budget (within one granule).",
    "unbalanced-seed": (
        "reference mapping: layer importance by removal, inverse mapping to per-layer rates, "
        f"minimum effective rate {SEED_MIN_EFFECTIVE_RATE}, floors; the ratio requested from the mapping is chosen "
        "by bisection on the parameter count so the model lands closest to the target (achieved ratio reported)."
    ),
    "unbalanced": "per-layer sensitivity curves + exact DP allocation at the same parameter budget as `uniform`.",
}
LAYER_IMPORTANCE_FOR = {"unbalanced-seed": "removal", "unbalanced": "sensitivity"}


@dataclasses.dataclass
class CompareSettings:
    """Everything that decides the numbers of a comparison (the runs' cache key is derived from it)."""

    ratios: tuple[float, ...]
    methods: tuple[str, ...] = METHODS
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    seq_len: int = 128
    dataset: str = "wikitext2"
    data_dir: str | None = None
    seed: int = 0
    calib_samples: int = 10
    calib_seq_len: int = 64
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 16
    throughput_repeats: int = 3
    save_models: bool = True
    importance: str = "taylor"
    mlp_step: int = 1


def parse_ratios(text: str | Sequence[float]) -> tuple[float, ...]:
    """'0.2,0.25' -> (0.2, 0.25): finite, in (0, 1), no duplicates; sorted ascending."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise InvalidInputError(f"--ratios: expected a comma-separated list like 0.2,0.25; got '{text}'")
        values = []
        for part in parts:
            try:
                values.append(float(part))
            except ValueError:
                raise InvalidInputError(f"--ratios: '{part}' is not a number (in '{text}')") from None
    else:
        values = [float(v) for v in text]
    if not values:
        raise InvalidInputError("--ratios: at least one ratio is needed")
    for value in values:
        if not math.isfinite(value) or not 0.0 < value < 1.0:
            raise InvalidInputError(f"--ratio: each ratio must be strictly between 0 and 1; got {value:g}")
    rounded = [round(v, 6) for v in values]
    if len(set(rounded)) != len(rounded):
        raise InvalidInputError(f"--ratios: duplicate ratio in {', '.join(f'{v:g}' for v in values)}")
    return tuple(sorted(rounded))


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    names = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InvalidInputError(f"--methods: unknown method '{', '.join(unknown) or text}'; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"--methods: duplicate method in '{','.join(names)}'")
    ordered = tuple(m for m in METHODS if m in names)
    return ordered if "dense" in ordered else ("dense", *ordered)  # Δ vs dense needs the dense run


def validate_settings(settings: CompareSettings) -> CompareSettings:
    ratios = parse_ratios(settings.ratios)
    methods = parse_methods(settings.methods)
    if settings.seq_len < 2:
        raise InvalidInputError(f"--seq-len must be at least 2; got {settings.seq_len}")
    if settings.max_tokens is not None and settings.max_tokens < settings.seq_len:
        raise InvalidInputError(f"--max-tokens {settings.max_tokens} is smaller than one window of --seq-len {settings.seq_len}")
    if settings.calib_samples < 1:
        raise InvalidInputError(f"--calib-samples must be positive; got {settings.calib_samples}")
    if settings.calib_seq_len < 2:
        raise InvalidInputError(f"--calib-seq-len must be at least 2; got {settings.calib_seq_len}")
    if settings.max_new_tokens < 1:
        raise InvalidInputError(f"--max-new-tokens must be positive; got {settings.max_new_tokens}")
    return dataclasses.replace(settings, ratios=ratios, methods=methods)


# --------------------------------------------------------------------------- keys, paths, persistence


def ratio_key(ratio: float) -> str:
    return f"{ratio:.6g}"


def run_path(out_dir: Path, method: str, ratio: float | None) -> Path:
    if method == "dense":
        return out_dir / "runs" / "dense.json"
    return out_dir / "runs" / ratio_key(ratio) / f"{method}.json"  # type: ignore[arg-type]


def model_dir(out_dir: Path, method: str, ratio: float) -> Path:
    return out_dir / "models" / ratio_key(ratio) / method


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # missing or torn: recompute


# --------------------------------------------------------------------------- per-model measurements


def layer_table(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Per-layer widths read from the model itself (KV groups, query heads, MLP channels)."""
    from layerprune.models import model_info

    info = model_info(model)
    return [
        {"layer": i, "kv_groups_kept": kv, "q_heads_kept": h, "mlp_kept": m}
        for i, (kv, h, m) in enumerate(zip(info["kv_heads"], info["heads"], info["intermediate"]))
    ]


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def measure_size(model: torch.nn.Module, tokenizer: Any, target: Path | None, report: dict[str, Any] | None) -> tuple[int, str | None]:
    """Save with `save_pruned` (to `target`, or a temporary folder deleted afterwards) and return the
    weights' size in bytes and the folder kept (or None)."""
    from layerprune.pruned_io import save_pruned

    if target is not None:
        folder = save_pruned(model, tokenizer, target, report=report, overwrite=True)
        return safetensors_bytes(folder), str(folder)
    with tempfile.TemporaryDirectory(prefix="layerprune-size-") as tmp:
        folder = save_pruned(model, None, Path(tmp) / "model")
        return safetensors_bytes(folder), None


def _device_name(model: torch.nn.Module) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


def measure_model(
    model: torch.nn.Module,
    tokenizer: Any,
    eval_ids: torch.Tensor,
    settings: CompareSettings,
    *,
    save_to: Path | None,
    progress: bool,
    save_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """PPL, parameter counts, saved size, throughput and greedy generations of one model."""
    from layerprune.evaluate import generate_greedy, perplexity, throughput
    from layerprune.models import count_parameters

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len=settings.seq_len, batch_size=1, progress=progress)
    seconds["eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok_s = throughput(model, seq_len=settings.seq_len, batch_size=1, repeats=settings.throughput_repeats)
    seconds["throughput"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    generations = (
        generate_greedy(model, tokenizer, list(settings.prompts), max_new_tokens=settings.max_new_tokens)
        if settings.prompts
        else []
    )
    seconds["generate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    size, folder = measure_size(model, tokenizer, save_to, save_report)
    seconds["save"] = time.perf_counter() - t0
    counts = count_parameters(model)
    return {
        "params": int(counts["total"]),
        "params_layers": int(counts["decoder_layers"]),
        "param_counts": counts,
        **{k: ppl[k] for k in ("ppl", "nll", "tokens", "predicted_tokens", "windows", "seq_len")},
        "size_bytes": int(size),
        "model_dir": folder,
        "tokens_per_s": float(tok_s),
        "device": _device_name(model),
        "generations": list(generations),
        "layers": layer_table(model),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- layer importance (once per model)


def layer_importance_to_json(li: Any) -> dict[str, Any]:
    """Everything needed to rebuild a LayerImportance, full curves included (its own `to_json` keeps
    only the sampled MLP points)."""
    out = li.to_json()
    out["mlp_step"] = int(li.mlp_step)
    if li.attn_curves is not None:
        out["attn_curves"] = [[float(v) for v in c] for c in li.attn_curves]
    if li.mlp_curves is not None:
        out["mlp_curves"] = [[float(v) for v in c] for c in li.mlp_curves]
    return out


def layer_importance_from_json(data: Mapping[str, Any]) -> Any:
    from layerprune.layer_importance import LayerImportance

    def curves(key: str) -> list[np.ndarray] | None:
        return None if data.get(key) is None else [np.asarray(c, dtype=np.float64) for c in data[key]]

    return LayerImportance(
        method=data["method"],
        attn=np.asarray(data["attn"], dtype=np.float64),
        mlp=np.asarray(data["mlp"], dtype=np.float64),
        combined=np.asarray(data["combined"], dtype=np.float64),
        attn_curves=curves("attn_curves"),
        mlp_curves=curves("mlp_curves"),
        mlp_step=int(data.get("mlp_step", 1)),
        metric=data.get("metric", "loss"),
        base_loss=data.get("base_loss"),
        seconds=float(data.get("seconds", 0.0)),
        details=dict(data.get("details") or {}),
    )


def compute_layer_importance(model: torch.nn.Module, calib_ids: torch.Tensor, method: str, settings: CompareSettings,
                             progress: bool) -> Any:
    """The layer importance `prune` would compute for this method, on a copy of the dense model:
    ``removal`` via `layer_importance.layer_importance`; ``sensitivity`` from the dense element scores
    (same importance kind, mlp_step and min_kv_groups as the pruning configs below)."""
    import copy

    from layerprune.group_scores import element_group_scores
    from layerprune.layer_importance import layer_importance, sensitivity_importance
    from layerprune.pipeline import seed_everything

    seed_everything(settings.seed)
    work = copy.deepcopy(model).eval()
    start = time.perf_counter()
    if method == "sensitivity":
        kv_scores, ch_scores = element_group_scores(work, calib_ids, importance=settings.importance, progress=progress)
        li = sensitivity_importance(work, calib_ids, kv_scores, ch_scores, mlp_step=settings.mlp_step,
                                    min_kv_groups=1, progress=progress)
    else:
        li = layer_importance(work, calib_ids, method, progress=progress)
    li.seconds = time.perf_counter() - start  # includes the element scores the curves need
    return li


# --------------------------------------------------------------------------- prune configs


def num_decoder_layers(model: torch.nn.Module) -> int:
    from layerprune.models import decoder_layers

    return len(decoder_layers(model))


def reference_range(num_layers: int) -> tuple[int, int]:
    """LLM-Pruner's block-wise range [3, L-1); for models too shallow for it, [1, L-1), else all layers."""
    start, end = REFERENCE_RANGE_START, num_layers - REFERENCE_RANGE_END_FROM_LAST
    if end - start >= 1:
        return start, end
    if num_layers >= 3:
        return 1, num_layers - 1
    return 0, num_layers


def prune_config(method: str, ratio: float, settings: CompareSettings, num_layers: int) -> Any:
    from layerprune.pipeline import PruneConfig

    common: dict[str, Any] = dict(importance=settings.importance, calib_samples=settings.calib_samples,
                  calib_seq_len=settings.calib_seq_len, mlp_step=settings.mlp_step, seed=settings.seed,
                  dataset=settings.dataset, data_dir=settings.data_dir)
    if method == "uniform-range":
        start, end = reference_range(num_layers)
        return PruneConfig(ratio=ratio, mode="uniform", match_params=False, layer_start=start, layer_end=end, **common)
    if method == "uniform":
        return PruneConfig(ratio=ratio, mode="uniform", match_params=True, **common)
    if method == "unbalanced-seed":
        return PruneConfig(ratio=ratio, mode="unbalanced", solver="seed", layer_importance="removal",
                           min_effective_rate=SEED_MIN_EFFECTIVE_RATE, **common)
    if method == "unbalanced":
        return PruneConfig(ratio=ratio, mode="unbalanced", solver="dp", layer_importance="sensitivity", **common)
    raise InvalidInputError(f"method: unknown '{method}'")


def allocated_params(model: torch.nn.Module, config: Any, importance: Any = None) -> int:
    """Total parameters after the allocation `config` asks for (no data, no pruning); `importance`
    is the layer importance the solver needs (the seed mapping), None for the uniform solvers."""
    from layerprune.allocation import allocate
    from layerprune.pipeline import _solver_for, build_allocation_spec

    num_layers = num_decoder_layers(model)
    spec = build_allocation_spec(model.config, config, importance, num_layers)
    return int(allocate(spec, solver=_solver_for(config)).params_after)


def closest_rate(params_after: Callable[[float], int | None], total: int, ratio: float,
                 iterations: int = 40) -> tuple[float, int]:
    """The requested rate whose whole-model parameter count is closest to ``(1 - ratio) * total``.
    The count is a non-increasing step function of the rate (floors, filters), so bisection finds the
    step that crosses the target; the closer of its two sides wins. `params_after` returns None for a
    request the solver cannot meet at all; the search then stays below it."""
    target = (1.0 - ratio) * total
    lo, hi = 1e-6, 1.0 - 1e-6
    p_lo, p_hi = params_after(lo), params_after(hi)
    while p_hi is None:  # back off to the largest request the solver accepts
        hi = 0.5 * (lo + hi)
        if hi - lo < 1e-9:
            raise InvalidInputError(f"no feasible request lands near ratio {ratio}")
        p_hi = params_after(hi)
    if p_lo is None:
        raise InvalidInputError(f"the smallest request is infeasible near ratio {ratio}")
    if p_hi > target:  # even the largest rate keeps too much (minimum widths): report what it achieves
        return hi, p_hi
    if p_lo <= target:
        return lo, p_lo
    for _ in range(iterations):  # invariant: params_after(lo) > target >= params_after(hi)
        mid = 0.5 * (lo + hi)
        p_mid = params_after(mid)
        if p_mid is None:  # a monotone solver never refuses a request between two it accepted
            raise InvalidInputError(f"request {mid:.6f} is infeasible between feasible ones")
        if p_mid > target:
            lo, p_lo = mid, p_mid
        else:
            hi, p_hi = mid, p_mid
    return (lo, p_lo) if abs(p_lo - target) < abs(p_hi - target) else (hi, p_hi)


def range_rate_for_ratio(model: torch.nn.Module, ratio: float, settings: CompareSettings,
                         params_after: Callable[[float], int] | None = None, iterations: int = 40) -> tuple[float, int]:
    """The per-layer rate inside the reference range that lands the model closest to `ratio`."""
    from layerprune.models import count_parameters

    num_layers = num_decoder_layers(model)
    if params_after is None:
        def params_after(rate: float) -> int:
            return allocated_params(model, prune_config("uniform-range", rate, settings, num_layers))
    return closest_rate(params_after, count_parameters(model)["total"], ratio, iterations)


def seed_ratio_for_ratio(model: torch.nn.Module, ratio: float, settings: CompareSettings, importance: Any,
                         iterations: int = 40) -> tuple[float, int]:
    """The ratio to request from the reference (seed) mapping so that, after its clipping, its
    minimum-effective-rate filter and its floors, the model lands closest to `ratio` of all
    parameters removed: the seed run is matched in parameter count where the mapping allows."""
    from layerprune.models import count_parameters

    num_layers = num_decoder_layers(model)

    def params_after(requested: float) -> int | None:
        try:
            return allocated_params(model, prune_config("unbalanced-seed", requested, settings, num_layers), importance)
        except InfeasibleError:
            return None

    return closest_rate(params_after, count_parameters(model)["total"], ratio, iterations)


def granule_params(model: torch.nn.Module, mlp_step: int = 1) -> int:
    """Parameters of the largest unit a solver moves: one KV group (its r query heads, K, V rows and
    o_proj columns) or one MLP step (gate/up rows + down column per channel)."""
    from layerprune.models import model_info

    info = model_info(model)
    hidden, head_dim = info["hidden"], info["head_dim"]
    r = info["heads"][0] // info["kv_heads"][0]
    kv_group = (2 * r + 2) * head_dim * hidden
    return max(kv_group, 3 * hidden * mlp_step)


# --------------------------------------------------------------------------- the comparison


def weights_probe(model: torch.nn.Module, per_tensor: int = 256) -> str:
    """Digest of the first values of every parameter tensor: tells two checkpoints of one shape apart."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        h.update(name.encode())
        h.update(param.detach().reshape(-1)[:per_tensor].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(model: torch.nn.Module, model_name: str, eval_ids: torch.Tensor, calib_ids: torch.Tensor,
                 settings: CompareSettings) -> dict[str, Any]:
    """What a stored run must share with the current invocation to be reused."""
    from layerprune.models import count_parameters, model_info

    info = model_info(model)
    info.pop("architecture", None)
    return {
        "model": model_name,
        "model_shape": info,
        "model_params": int(count_parameters(model)["total"]),
        "weights_probe": weights_probe(model),
        "dtype": str(next(model.parameters()).dtype),
        "eval_tokens": tokens_digest(eval_ids),
        "eval_tokens_count": int(eval_ids.numel()),
        "seq_len": settings.seq_len,
        "calib_tokens": tokens_digest(calib_ids),
        "seed": settings.seed,
        "importance": settings.importance,
        "mlp_step": settings.mlp_step,
        "prompts": list(settings.prompts),
        "max_new_tokens": settings.max_new_tokens,
    }


IMPORTANCE_FINGERPRINT_KEYS = ("model", "model_shape", "model_params", "weights_probe", "dtype", "calib_tokens", "seed", "importance",
                               "mlp_step")


class _Store:
    """Finished runs and layer importance under DIR, written temp + rename, reused on a match."""

    def __init__(self, out_dir: Path, fingerprint: Mapping[str, Any], log: Callable[[str], None]):
        self.out_dir = out_dir
        self.key = _digest(fingerprint)
        # layer importance depends on the model and the calibration batch only, not on the test tokens
        self.importance_key = _digest({k: fingerprint[k] for k in IMPORTANCE_FINGERPRINT_KEYS})
        self.log = log

    def load_run(self, method: str, ratio: float | None, config_json: Mapping[str, Any] | None) -> dict[str, Any] | None:
        path = run_path(self.out_dir, method, ratio)
        data = _load_json(path)
        if data is None:
            return None
        if data.get("fingerprint") != self.key or data.get("config") != (None if config_json is None else dict(config_json)):
            self.log(f"{path} was made with other settings: recomputing it")
            return None
        return data

    def save_run(self, run: dict[str, Any]) -> None:
        ratio = None if run["method"] == "dense" else run["target_ratio"]
        report_mod.write_json_atomic(run_path(self.out_dir, run["method"], ratio), dict(run, fingerprint=self.key))

    def importance_path(self, method: str) -> Path:
        return self.out_dir / "layer_importance" / f"{method}.json"

    def load_importance(self, method: str) -> Any | None:
        data = _load_json(self.importance_path(method))
        if data is None or data.get("fingerprint") != self.importance_key:
            return None
        return layer_importance_from_json(data["layer_importance"])

    def save_importance(self, li: Any) -> None:
        report_mod.write_json_atomic(self.importance_path(li.method),
                                     {"fingerprint": self.importance_key, "layer_importance": layer_importance_to_json(li)})


def _pct_line(run: Mapping[str, Any]) -> str:
    if run["method"] == "dense":
        return f"dense: PPL {run['ppl']:.3f}, {run['params']:,} params"
    return (f"{run['method']} @ {run['target_ratio']:g}: PPL {run['ppl']:.3f}, actual ratio "
            f"{run['actual_ratio']:.4f} ({run['params']:,} params)")


def compare(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: CompareSettings,
    out_dir: str | os.PathLike[str],
    *,
    model_name: str = "model",
    eval_ids: torch.Tensor | None = None,
    calib_ids: torch.Tensor | None = None,
    command: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every method at every ratio, then write report.json, report.md and the plots.

    ``eval_ids`` (1-D test tokens) and ``calib_ids`` ([n, seq_len] calibration tokens) default to
    WikiText-2 test / calibration split through `layerprune.data`. Returns the report object.
    """
    from layerprune.data import calibration_batch, calibration_split, eval_tokens
    from layerprune.pipeline import prune

    settings = validate_settings(settings)
    log = log or (lambda message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    num_layers = num_decoder_layers(model)
    if eval_ids is None:
        eval_ids = eval_tokens(tokenizer, settings.dataset, settings.data_dir, "test", settings.max_tokens)
    elif settings.max_tokens is not None:
        eval_ids = eval_ids[: settings.max_tokens]
    if calib_ids is None:
        calib_ids = calibration_batch(tokenizer, settings.calib_samples, settings.calib_seq_len, settings.seed,
                                      settings.dataset, settings.data_dir)
        calib_split = calibration_split(settings.data_dir, settings.dataset)
    else:
        calib_split = "given"
    store = _Store(out, _fingerprint(model, model_name, eval_ids, calib_ids, settings), log)

    runs: list[dict[str, Any]] = []
    dense = store.load_run("dense", None, None)
    if dense is not None:
        log("reusing " + _pct_line(dense))
    else:
        log("evaluating the dense model")
        dense = {"method": "dense", "target_ratio": 0.0, "config": None,
                 **measure_model(model, tokenizer, eval_ids, settings, save_to=None, progress=progress)}
        dense.update(actual_ratio=0.0, actual_ratio_layers=0.0)
        store.save_run(dense)
        log(_pct_line(dense))
    runs.append(dense)

    importances: dict[str, Any] = {}

    def importance_for(method: str) -> Any:
        if method not in importances:
            li = store.load_importance(method)
            if li is None:
                log(f"computing layer importance: {method}")
                li = compute_layer_importance(model, calib_ids, method, settings, progress)
                store.save_importance(li)
            importances[method] = li
        return importances[method]

    for method in settings.methods:  # reload cached importance for the report even when every run is reused
        if method in LAYER_IMPORTANCE_FOR and store.importance_path(LAYER_IMPORTANCE_FOR[method]).is_file():
            li = store.load_importance(LAYER_IMPORTANCE_FOR[method])
            if li is not None:
                importances[li.method] = li

    for ratio in settings.ratios:
        for method in settings.methods:
            if method == "dense":
                continue
            config = prune_config(method, ratio, settings, num_layers)
            range_rate = None
            if method == "uniform-range":
                range_rate, _ = range_rate_for_ratio(model, ratio, settings)
                config = prune_config(method, range_rate, settings, num_layers)
            elif method == "unbalanced-seed":
                requested, _ = seed_ratio_for_ratio(model, ratio, settings, importance_for("removal"))
                config = prune_config(method, requested, settings, num_layers)
            run = store.load_run(method, ratio, config.to_json())
            if run is not None:
                log("reusing " + _pct_line(run))
                runs.append(run)
                continue
            log(f"{method} @ {ratio:g}: pruning")
            li_method = LAYER_IMPORTANCE_FOR.get(method)
            li = importance_for(li_method) if li_method else None
            t0 = time.perf_counter()
            result = prune(model, tokenizer, config, layer_importance=li, calib_ids=calib_ids, progress=progress)
            prune_seconds = time.perf_counter() - t0
            timings = result.report.get("timings", {})
            save_to = model_dir(out, method, ratio) if settings.save_models else None
            measured = measure_model(result.model, tokenizer, eval_ids, settings, save_to=save_to, progress=progress,
                                     save_report=result.report)
            seconds = {
                "layer_importance": float(li.seconds) if li is not None else 0.0,
                "scoring": float(timings.get("element_scores", 0.0)),
                "allocation": float(timings.get("allocation", 0.0)),
                "pruning": float(timings.get("pruning", 0.0)),
                "prune_total": prune_seconds,
                **measured.pop("seconds"),
            }
            layers = measured.pop("layers")
            for entry, dense_layer in zip(layers, dense["layers"]):
                entry["attn_rate"] = 1.0 - entry["kv_groups_kept"] / dense_layer["kv_groups_kept"]
                entry["mlp_rate"] = 1.0 - entry["mlp_kept"] / dense_layer["mlp_kept"]
            alloc = result.allocation
            run = {
                "method": method,
                "target_ratio": ratio,
                "actual_ratio": 1.0 - measured["params"] / dense["params"],
                "actual_ratio_layers": 1.0 - measured["params_layers"] / dense["params_layers"],
                **measured,
                "layers": layers,
                "seconds": seconds,
                "config": config.to_json(),
                "range_rate": range_rate,
                "allocation_params_after": int(getattr(alloc, "params_after", measured["params"])),
                "allocation_granule": getattr(alloc, "granule", None),
            }
            store.save_run(run)
            runs.append(run)
            log(_pct_line(run))
            del result

    report = build_report(runs, settings, model, model_name, importances, calib_split, command)
    report["plots"] = write_plots(out, runs, importances)
    report_mod.write_report(out, report)
    return report


def param_match(runs: Sequence[Mapping[str, Any]], model_granule: int) -> list[dict[str, Any]]:
    """`uniform` vs `unbalanced` parameter counts at each ratio (both target the same budget). The
    granule is the allocation's own (its stated precision) when recorded, else one KV group."""
    out = []
    for ratio in report_mod.target_ratios(runs):
        at = {r["method"]: r for r in runs if r["method"] != "dense" and math.isclose(r["target_ratio"], ratio)}
        if "uniform" in at and "unbalanced" in at:
            a, b = at["uniform"]["params"], at["unbalanced"]["params"]
            recorded = [at[m].get("allocation_granule") for m in ("uniform", "unbalanced")]
            granules = [g for g in recorded if isinstance(g, int) and g > 0]
            granule = max(granules) if len(granules) == len(recorded) else model_granule
            out.append({"target_ratio": ratio, "a": "uniform", "b": "unbalanced", "params_a": a, "params_b": b,
                        "difference": b - a, "granule": granule, "within_granule": abs(b - a) <= granule})
    return out


def build_report(runs: list[dict[str, Any]], settings: CompareSettings, model: torch.nn.Module, model_name: str,
                 importances: Mapping[str, Any], calib_split: str, command: Sequence[str] | None) -> dict[str, Any]:
    settings_json = dataclasses.asdict(settings)
    settings_json.update(ratios=list(settings.ratios), methods=list(settings.methods), prompts=list(settings.prompts),
                         calib_split=calib_split, device=runs[0].get("device"),
                         reference_range=list(reference_range(num_decoder_layers(model))))
    return {
        "schema": report_mod.SCHEMA,
        "model": model_name,
        "command": list(command) if command is not None else report_mod.command_line(),
        "versions": report_mod.versions(),
        "settings": settings_json,
        "methods": list(settings.methods),
        "method_notes": {m: METHOD_NOTES[m] for m in settings.methods},
        "runs": report_mod.sorted_runs(runs, settings.methods),
        "verdicts": report_mod.verdicts(runs),
        "param_match": param_match(runs, granule_params(model, settings.mlp_step)),
        "layer_importance": {name: li.to_json() for name, li in importances.items()},
        "prompts": list(settings.prompts),
    }


def write_plots(out: Path, runs: Sequence[Mapping[str, Any]], importances: Mapping[str, Any]) -> list[str]:
    """PNG files relative to `out`: importance, allocation per ratio, PPL vs ratio (2+ ratios)."""
    written = []
    if importances:
        plots.plot_importance({n: li.to_json() for n, li in importances.items()}, out / "importance.png")
        written.append("importance.png")
    dense = [r for r in runs if r["method"] == "dense"]
    ratios = report_mod.target_ratios(runs)
    for ratio in ratios:
        at = [r for r in runs if r["method"] != "dense" and math.isclose(r["target_ratio"], ratio)]
        name = f"allocation_{ratio_key(ratio)}.png"
        plots.plot_allocation(dense + at, out / name, title=f"kept widths per layer, target ratio {ratio:g}")
        written.append(name)
    if len(ratios) >= 2:
        plots.plot_ppl_vs_ratio(runs, out / "ppl_vs_ratio.png")
        written.append("ppl_vs_ratio.png")
    return written
