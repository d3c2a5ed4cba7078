"""What a comparison runs: its methods, its settings and the pruning config of each method."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from layerprune.errors import InvalidInputError
from layerprune.pruning.config import DEFAULT_METHOD, FALLBACK_METHOD, PruneConfig, resolve_config

# a comparison's shared settings default to the library's (PruneConfig)
_DEFAULT = {f.name: f.default for f in dataclasses.fields(PruneConfig)}

METHODS = ("dense", "uniform-range", "uniform", "uniform-refit", "uniform-obs", "uniform-homogeneous", "flap",
           "slimgpt", "unbalanced-seed", "unbalanced-norefit", "unbalanced-sensitivity", "unbalanced",
           "unbalanced-search")
PRUNED_METHODS = METHODS[1:]
# what a comparison runs unless told: every method but the search (minutes per run where the others take seconds)
DEFAULT_METHODS = tuple(m for m in METHODS if m != "unbalanced-search")
# LLM-Pruner's llama3.py: block_*_layer_start=3, block_*_layer_end=31 for 32 layers -> [3, L-1)
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
    "unbalanced-norefit": "per-layer sensitivity curves (masking, no refit) + exact DP allocation at the same "
                          "parameter budget as `uniform`; the kept weights are not changed.",
    "uniform-refit": "`uniform`, then the kept o_proj / down_proj columns refit by least squares on calibration "
                     "activations, layer by layer with error correction.",
    "uniform-homogeneous": "the same KV groups and MLP channels in every layer (the `homogeneous` allocation: exact "
                           "budget to one step per layer; the widths closest to one rate for attention and MLP), then the same "
                           "refit as `uniform-refit`; saved under the family's own config (no remote code).",
    "uniform-obs": "`uniform`, with the kept KV groups and channels chosen by structured OBS (the least error "
                   "after the refit, removed one by one with inverse-Hessian updates) and the OBS refit, layer by "
                   "layer with error correction.",
    "slimgpt": "SlimGPT (Ling et al. 2024), reimplemented: structured OBS selection and refit layer by layer with "
               "error correction, layer rates rising like ln(l + 2) with depth (its incremental pruning ratio), "
               "realised by the exact DP at the same budget as `uniform`.",
    "unbalanced-sensitivity": "per-layer sensitivity curves measured after the OBS refit (one pruned evaluation "
                              "per point) + exact DP allocation, then OBS selection and refit (same budget).",
    "unbalanced": "the project's best method: per-layer curves of the loss estimated from the Fisher-weighted "
                  "reconstruction error after the OBS refit (no pruned evaluations) + exact DP allocation, then "
                  "OBS selection and refit layer by layer with error correction (same budget as `uniform`).",
    "flap": "FLAP (An et al. 2024), reimplemented and checked against its released code: fluctuation metric "
            "Var(X)·‖W[:, j]‖² (squared for o_proj's columns), standardised per layer and module over columns (a KV "
            "group scores its columns' mean), one global threshold counting each group and channel by its "
            "parameters, bias compensation; statistics from the refit batch; same budget as `uniform`.",
    "unbalanced-search": "`unbalanced`, then an evolutionary search over the allocation seeded by its `dp` answer, "
                         "each candidate scored by the KL of the whole pruned model from the dense one on held-out "
                         "calibration windows (EvoPress, Týr); the searched widths are kept only when their own refit "
                         "model scores better than `unbalanced`'s.",
}
# The layer importance each method reads (cached once per key, shared by every ratio).
LAYER_IMPORTANCE_FOR = {"unbalanced-seed": "removal", "unbalanced-norefit": "sensitivity",
                        "unbalanced-sensitivity": "sensitivity-obs", "unbalanced": DEFAULT_METHOD["layer_importance"],
                        "unbalanced-search": DEFAULT_METHOD["layer_importance"],
                        "slimgpt": "depth"}
# they read the refit batch
REFIT_METHODS = ("uniform-refit", "uniform-obs", "uniform-homogeneous", "flap", "slimgpt", "unbalanced-sensitivity",
                 "unbalanced", "unbalanced-search")


@dataclasses.dataclass
class CompareSettings:
    """Everything that decides the numbers of a comparison (the runs' cache key is derived from it)."""

    ratios: tuple[float, ...]
    methods: tuple[str, ...] = DEFAULT_METHODS
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    seq_len: int = 128
    dataset: str = "wikitext2"  # evaluated text: wikitext2's test split, or a .txt file
    calib_dataset: str = "wikitext2"  # calibration text: wikitext2's train (else valid) split, or a .txt file
    data_dir: str | None = None
    seed: int = _DEFAULT["seed"]
    calib_samples: int = _DEFAULT["calib_samples"]
    calib_seq_len: int = _DEFAULT["calib_seq_len"]
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 16
    throughput_repeats: int = 3
    save_models: bool = True
    importance: str = FALLBACK_METHOD["importance"]  # the element score of the methods that choose by one
    mlp_step: int = _DEFAULT["mlp_step"]
    fresh: bool = False  # recompute every run and layer importance instead of reusing stored ones
    refit: str = _DEFAULT["refit"]  # the refit of the *-refit methods
    refit_samples: int = _DEFAULT["refit_samples"]  # their own calibration windows (more text than the curves need)
    refit_seq_len: int = _DEFAULT["refit_seq_len"]
    kv_cache_ratio: float | None = None  # methods on an exact budget also remove at least this of the KV cache
    flops_ratio: float | None = None  # ... and of the FLOPs per token
    flops_seq_len: int = _DEFAULT["flops_seq_len"]  # positions of the FLOPs count (every run reports its FLOPs at this length)
    search_generations: int = _DEFAULT["search_generations"]  # unbalanced-search: its generations


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
    for flag, value in (("--kv-cache-ratio", settings.kv_cache_ratio), ("--flops-ratio", settings.flops_ratio)):
        if value is not None and not (math.isfinite(value) and 0.0 < value < 1.0):
            raise InvalidInputError(f"{flag} must be strictly between 0 and 1; got {value:g}")
    if isinstance(settings.search_generations, bool) or not isinstance(settings.search_generations, int) \
            or settings.search_generations < 0:
        raise InvalidInputError(f"--search-generations must be a non-negative integer; got {settings.search_generations}")
    if settings.flops_seq_len < 1:
        raise InvalidInputError(f"--flops-seq-len must be positive; got {settings.flops_seq_len}")
    return dataclasses.replace(settings, ratios=ratios, methods=methods)


def reference_range(num_layers: int) -> tuple[int, int]:
    """LLM-Pruner's block-wise range [3, L-1); for models too shallow for it, [1, L-1), else all layers."""
    start, end = REFERENCE_RANGE_START, num_layers - REFERENCE_RANGE_END_FROM_LAST
    if end - start >= 1:
        return start, end
    if num_layers >= 3:
        return 1, num_layers - 1
    return 0, num_layers


def takes_bounds(config: PruneConfig) -> bool:
    """Whether a method meets --kv-cache-ratio / --flops-ratio: those on an exact parameter budget (uniform with
    match_params; unbalanced with greedy, lagrange or dp). The others (LLM-Pruner's range, the seed mapping, FLAP's
    threshold) are parameter-matched references: they run as they are, and the report shows the ratios they reach."""
    if config.mode == "uniform":
        return bool(config.match_params)
    return config.mode == "unbalanced" and config.solver in ("greedy", "lagrange", "dp")


def prune_config(method: str, ratio: float, settings: CompareSettings, num_layers: int) -> Any:
    """The pruning config of ``method`` at ``ratio``, with the KV-cache / FLOPs bounds when it takes them."""
    config = _method_config(method, ratio, settings, num_layers)
    if takes_bounds(config):
        config = dataclasses.replace(config, kv_cache_ratio=settings.kv_cache_ratio, flops_ratio=settings.flops_ratio)
    return resolve_config(config)


def _method_config(method: str, ratio: float, settings: CompareSettings, num_layers: int) -> Any:
    # every method names what it differs in; refit="none" for the methods that keep the kept weights as they are
    common: dict[str, Any] = dict(importance=settings.importance, calib_samples=settings.calib_samples,
                  calib_seq_len=settings.calib_seq_len, mlp_step=settings.mlp_step, seed=settings.seed,
                  calib_dataset=settings.calib_dataset, data_dir=settings.data_dir, flops_seq_len=settings.flops_seq_len,
                  refit="none")
    if method == "uniform-range":
        start, end = reference_range(num_layers)
        return PruneConfig(ratio=ratio, mode="uniform", match_params=False, layer_start=start, layer_end=end, **common)
    if method == "uniform":
        return PruneConfig(ratio=ratio, mode="uniform", match_params=True, **common)
    if method == "unbalanced-seed":
        return PruneConfig(ratio=ratio, mode="unbalanced", solver="seed", layer_importance="removal",
                           min_effective_rate=SEED_MIN_EFFECTIVE_RATE, **common)
    if method == "unbalanced-norefit":
        return PruneConfig(ratio=ratio, mode="unbalanced", solver="dp", layer_importance="sensitivity", **common)
    refit = dict(common, refit=settings.refit, refit_samples=settings.refit_samples, refit_seq_len=settings.refit_seq_len)
    if method == "uniform-refit":
        return PruneConfig(ratio=ratio, mode="uniform", match_params=True, **refit)
    if method == "uniform-homogeneous":
        return PruneConfig(ratio=ratio, mode="uniform", match_params=True, homogeneous=True, **refit)
    if method == "flap":
        return PruneConfig(ratio=ratio, mode="flap", **dict(refit, refit="bias"), refit_error_correction=False)
    obs = dict(refit, importance="obs", refit="lstsq")
    if method == "uniform-obs":
        return PruneConfig(ratio=ratio, mode="uniform", match_params=True, **obs)
    if method == "slimgpt":
        return PruneConfig(ratio=ratio, mode="unbalanced", solver="dp", layer_importance="depth", **obs)
    if method == "unbalanced-sensitivity":
        return PruneConfig(ratio=ratio, mode="unbalanced", solver="dp", layer_importance="sensitivity", **obs)
    if method in ("unbalanced", "unbalanced-search"):  # the library's default method, at the shared settings
        search = dict(allocation="search", search_generations=settings.search_generations) if method.endswith("search") else {}
        return PruneConfig(ratio=ratio, **{k: v for k, v in refit.items() if k not in ("importance", "refit")}, **search)
    raise InvalidInputError(f"method: unknown '{method}'")
