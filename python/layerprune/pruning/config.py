"""What a pruning run does (:class:`PruneConfig`), its defaults, and the checks made once, at the entry point.

The defaults are the best measured method (docs/results.md): reconstruction curves (the loss after the refit,
estimated from the Fisher-weighted reconstruction error) allocated by ``dp``, structured OBS selection (SlimGPT) and
the least-squares refit with error correction. ``resolve_config`` fills what a config leaves open for the executor
that runs it (the whole model in memory, or layer by layer from disk) and checks it once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from layerprune.allocation import UNBALANCED_SOLVERS as SOLVERS
from layerprune.errors import InvalidInputError
from layerprune.importance import METHODS as LAYER_IMPORTANCE_METHODS
from layerprune.refit import REFIT_MODES
from layerprune.refit import DEFAULT_DAMPING
from layerprune.scoring.groups import GRADIENT_KINDS, IMPORTANCE_KINDS

# The default method, the best measured: changing the default method is changing this line.
DEFAULT_METHOD = {"importance": "obs", "layer_importance": "reconstruction", "refit": "lstsq"}
# Where the default cannot run (OBS needs the lstsq refit and one step; reconstruction curves need a backward
# through the whole model, which the layer-by-layer executor never holds): the next best that can.
FALLBACK_METHOD = {"importance": "taylor", "layer_importance": "sensitivity"}

# The executors: the whole model in memory (pipeline.prune), or one decoder layer at a time from a checkpoint on
# disk (sequential.prune_sequential).
EXECUTORS = ("memory", "layers")
# element scores one layer can compute on its own, and structured OBS (on the layer's own refit Grams)
SEQUENTIAL_IMPORTANCE = ("activation", "l1", "l2", "obs")
SEQUENTIAL_LAYER_IMPORTANCE = ("removal", "activation", "sensitivity", "depth")
# FLAP scores by its fluctuation metric (pruning/flap.py); its config's importance, never read, resolves to this
FLAP_IMPORTANCE = "activation"

MODES = ("unbalanced", "uniform", "flap")
# How unbalanced widths are chosen: the solver alone, or an evolutionary search scored by the whole model's KL from
# the dense model, seeded by the solver's answer (pruning/search.py).
ALLOCATIONS = ("solve", "search")
# What chooses the kept heads and channels: an element score, or structured OBS on the refit's Grams
# (the error after the refit, :mod:`layerprune.refit.obs`; SlimGPT).
IMPORTANCES = IMPORTANCE_KINDS + ("obs",)


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Its defaults are the best measured method (``DEFAULT_METHOD``); ``importance`` and
    ``layer_importance`` left at None are filled by :func:`resolve_config` for the executor that runs it."""

    ratio: float
    mode: str = "unbalanced"
    solver: str = "dp"
    layer_importance: str | None = None  # None: DEFAULT_METHOD's where the run can take it (resolve_config)
    removal_metric: str = "loss"  # removal importance: calibration loss increase, or perplexity increase ("ppl")
    importance: str | None = None  # None: DEFAULT_METHOD's where the run can take it (resolve_config)
    calib_samples: int = 10
    calib_seq_len: int = 64
    iterative_steps: int = 1
    match_params: bool = False
    layer_start: int | None = None
    layer_end: int | None = None
    attn_layer_start: int | None = None
    attn_layer_end: int | None = None
    mlp_layer_start: int | None = None
    mlp_layer_end: int | None = None
    min_effective_rate: float = 0.0
    protected: tuple[int, ...] = ()
    mlp_step: int = 1
    min_kv_groups: int = 1  # 0: a layer may lose its whole attention (an empty block)
    min_mlp_channels: int = 1  # 0: a layer may lose its whole MLP
    tie: bool = False
    homogeneous: bool = False  # the same widths in every layer (the `homogeneous` solver): a plain family config
    seed: int = 0
    calib_dataset: str = "wikitext2"  # calibration text: 'wikitext2' (its train, else valid split) or a .txt file
    data_dir: str | None = None
    curve_samples: int | None = None  # curves on the first n sequences (sensitivity: calibration, reconstruction: refit)
    refit: str = DEFAULT_METHOD["refit"]  # refit the kept o_proj / down_proj columns: none, lstsq, lstsq-bias, bias
    refit_damping: float = DEFAULT_DAMPING  # λ = refit_damping · mean diagonal of the Gram matrix
    refit_error_correction: bool = True  # layer l is refit on the outputs of the refit layers 0..l-1
    refit_samples: int = 64  # calibration windows of the refit (its own batch; 64 x 256: benches/calibration_study.py)
    refit_seq_len: int = 256
    fisher_samples: int | None = 4  # reconstruction: the Fisher from the first n refit windows (None: all)
    kv_cache_ratio: float | None = None  # also remove at least this fraction of the KV-cache bytes per token
    flops_ratio: float | None = None  # also remove at least this fraction of the FLOPs per token ...
    flops_seq_len: int = 2048  # ... of a forward over this many positions
    fsdp: bool = False  # gradient element scores on an FSDP2-sharded copy (layerprune.scoring.sharded)
    allocation: str = "solve"  # "search": an evolutionary search seeded by the solver (pruning/search.py)
    search_generations: int = 40  # the most generations of the search
    search_time: float | None = None  # seconds after which the search starts no new generation
    search_offspring: int = 12  # candidates per generation
    search_samples: int = 16  # held-out windows of refit_seq_len tokens the KL fitness is measured on (as many
    # more check the final choice)

    # the executor resolve_config checked this config for (not a setting: never compared, copied or saved)
    _resolved_for: str | None = field(default=None, init=False, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["protected"] = list(self.protected)
        return out


# ---------------------------------------------------------------------------------------------
# Validation (usable before any model is loaded)
# ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_fields(config: PruneConfig, executor: str) -> None:
    """Field checks that need no model. Raises InvalidInputError naming the field."""
    r = config.ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 < r < 1.0:
        raise InvalidInputError(f"ratio: must be a fraction strictly between 0 and 1, got {r!r}")
    if config.mode not in MODES:
        raise InvalidInputError(f"mode: expected one of {', '.join(MODES)}, got {config.mode!r}")
    if executor == "layers":  # what the executor cannot run at all comes first: no other choice would help
        _check_layer_by_layer(config)
    if config.solver not in SOLVERS:
        raise InvalidInputError(f"solver: expected one of {', '.join(SOLVERS)}, got {config.solver!r}")
    if config.removal_metric not in ("loss", "ppl"):
        raise InvalidInputError(f"removal_metric: expected 'loss' or 'ppl', got {config.removal_metric!r}")
    if config.layer_importance not in LAYER_IMPORTANCE_METHODS:
        raise InvalidInputError(
            f"layer_importance: expected one of {', '.join(LAYER_IMPORTANCE_METHODS)}, got {config.layer_importance!r}"
        )
    if config.importance not in IMPORTANCES:
        raise InvalidInputError(f"importance: expected one of {', '.join(IMPORTANCES)}, got {config.importance!r}")
    if config.layer_importance == "reconstruction" and config.mode == "unbalanced" and config.refit != "lstsq":
        raise InvalidInputError("layer_importance reconstruction: estimates the loss after the least-squares refit, "
                                "so it needs refit lstsq")
    if config.importance == "obs" and (config.refit != "lstsq" or config.mode == "flap" or config.iterative_steps != 1
                                       or config.fsdp):
        raise InvalidInputError("importance obs: chooses by the error after the least-squares refit, so it needs "
                                "refit lstsq, one pruning step, and mode unbalanced or uniform (no fsdp)")
    for name, low in (("calib_samples", 1), ("calib_seq_len", 2), ("iterative_steps", 1), ("mlp_step", 1),
                      ("min_kv_groups", 0), ("min_mlp_channels", 0)):
        v = getattr(config, name)
        if not _is_int(v) or v < low:
            raise InvalidInputError(f"{name}: must be an integer >= {low}, got {v!r}")
    if (config.min_kv_groups == 0 or config.min_mlp_channels == 0) and config.iterative_steps != 1:
        raise InvalidInputError("min_kv_groups / min_mlp_channels 0 (empty blocks): needs one pruning step (a block "
                                "emptied at one step has nothing left to score at the next)")
    _validate_homogeneous(config)
    if config.mode == "flap" and config.iterative_steps != 1:
        raise InvalidInputError("iterative_steps: FLAP prunes in one step (its scores and threshold are global)")
    if config.fsdp and (config.mode == "flap" or config.importance not in ("taylor", "vectorize")):
        raise InvalidInputError(
            "fsdp: shards the backward of the gradient scores taylor and vectorize only (taylor2 / taylor-mix need "
            "per-sample gradients, which FSDP's reduce-scatter adds together; the other scores need no backward)"
        )
    if config.refit not in REFIT_MODES:
        raise InvalidInputError(f"refit: expected one of {', '.join(REFIT_MODES)}, got {config.refit!r}")
    d = config.refit_damping
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise InvalidInputError(f"refit_damping: must be in [0, 1), got {d!r}")
    for name, low in (("refit_samples", 1), ("refit_seq_len", 2)):
        v = getattr(config, name)
        if not _is_int(v) or v < low:
            raise InvalidInputError(f"{name}: must be an integer >= {low}, got {v!r}")
    if config.curve_samples is not None and (not _is_int(config.curve_samples) or config.curve_samples < 1):
        raise InvalidInputError(f"curve_samples: must be an integer >= 1, got {config.curve_samples!r}")
    _check_search(config)
    if config.fisher_samples is not None and (not _is_int(config.fisher_samples) or config.fisher_samples < 1):
        raise InvalidInputError(f"fisher_samples: must be an integer >= 1, got {config.fisher_samples!r}")
    if not _is_int(config.seed) or config.seed < 0:
        raise InvalidInputError(f"seed: must be a non-negative integer, got {config.seed!r}")
    m = config.min_effective_rate
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
        raise InvalidInputError(f"min_effective_rate: must be in [0, 1), got {m!r}")
    for name in ("layer_start", "layer_end", "attn_layer_start", "attn_layer_end", "mlp_layer_start", "mlp_layer_end"):
        v = getattr(config, name)
        if v is not None and (not _is_int(v) or v < 0):
            raise InvalidInputError(f"{name}: must be a non-negative layer index, got {v!r}")
    if any(not _is_int(p) or p < 0 for p in config.protected):
        raise InvalidInputError(f"protected: layer indices must be non-negative integers, got {list(config.protected)}")
    for name in ("kv_cache_ratio", "flops_ratio"):
        v = getattr(config, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or not 0.0 < v < 1.0):
            raise InvalidInputError(f"{name}: must be a fraction strictly between 0 and 1, got {v!r}")
    if not _is_int(config.flops_seq_len) or config.flops_seq_len < 1:
        raise InvalidInputError(f"flops_seq_len: must be an integer >= 1, got {config.flops_seq_len!r}")
    bounded = [n for n in ("kv_cache_ratio", "flops_ratio") if getattr(config, n) is not None]
    if bounded and config.mode == "uniform" and not config.match_params:
        raise InvalidInputError(f"{bounded[0]}: uniform mode needs match_params with it (LLM-Pruner's per-layer rate "
                                "takes no KV-cache or FLOPs budget)")
    if bounded and config.mode == "unbalanced" and config.solver == "seed":
        raise InvalidInputError(f"{bounded[0]}: the seed mapping takes no KV-cache or FLOPs budget "
                                "(use solver greedy, lagrange or dp)")
    if bounded and config.mode not in ("uniform", "unbalanced"):
        raise InvalidInputError(f"{bounded[0]}: mode {config.mode} takes no KV-cache or FLOPs budget "
                                "(use mode unbalanced with solver greedy, lagrange or dp, or uniform with match_params)")


def _check_search(config: PruneConfig) -> None:
    """The search's fields, and what it needs: unbalanced widths from a solver, and the widths' variants built the
    way the final model is (structured OBS and the least-squares refit)."""
    if config.allocation not in ALLOCATIONS:
        raise InvalidInputError(f"allocation: expected one of {', '.join(ALLOCATIONS)}, got {config.allocation!r}")
    for name, low in (("search_generations", 0), ("search_offspring", 1), ("search_samples", 1)):
        v = getattr(config, name)
        if not _is_int(v) or v < low:
            raise InvalidInputError(f"{name}: must be an integer >= {low}, got {v!r}")
    t = config.search_time
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
        raise InvalidInputError(f"search_time: must be a positive number of seconds, got {t!r}")
    if config.allocation != "search":
        return
    if config.mode != "unbalanced" or config.homogeneous or config.solver == "seed":
        raise InvalidInputError("allocation search: moves unbalanced widths from a solver's answer; it needs mode "
                                "unbalanced with solver greedy, lagrange or dp (not homogeneous)")
    if config.importance != "obs" or config.refit != "lstsq":
        raise InvalidInputError("allocation search: scores each candidate with the widths pruned by structured OBS and "
                                "refit by least squares, as the final model is; it needs importance obs and refit lstsq")


def _validate_homogeneous(config: PruneConfig) -> None:
    """What ``homogeneous`` (one width for every layer) cannot be combined with, refused in one line."""
    if not isinstance(config.homogeneous, bool):
        raise InvalidInputError(f"homogeneous: must be True or False, got {config.homogeneous!r}")
    if not config.homogeneous:
        return
    if config.mode == "flap":
        raise InvalidInputError("mode: homogeneous needs mode uniform (with match_params) or unbalanced; FLAP's "
                                "global threshold sets its own per-layer widths")
    if config.mode == "uniform" and not config.match_params:
        raise InvalidInputError("match_params: homogeneous in uniform mode needs match_params (it removes exactly "
                                "ratio of all parameters; without it LLM-Pruner's per-layer floors are used)")
    if config.mode == "unbalanced" and config.solver == "seed":
        raise InvalidInputError("solver: homogeneous is its own allocation (one width for every layer, by the "
                                "layer importance); the seed mapping cannot be combined with it")
    if config.protected:
        raise InvalidInputError(f"protected: homogeneous keeps the same widths in every layer, so layers "
                                f"{sorted(set(config.protected))} cannot stay whole (drop protected)")


def layer_ranges(config: PruneConfig, num_layers: int) -> dict[str, tuple[int, int]]:
    """Resolved [start, end) of the attention and MLP ranges; checked against the model depth."""
    out = {}
    for part in ("attn", "mlp"):
        start = getattr(config, f"{part}_layer_start")
        end = getattr(config, f"{part}_layer_end")
        start = config.layer_start if start is None else start
        end = config.layer_end if end is None else end
        start = 0 if start is None else int(start)
        end = num_layers if end is None else int(end)
        if not 0 <= start < end <= num_layers:
            raise InvalidInputError(
                f"{part}_layer_start/end: range [{start}, {end}) is outside the model's {num_layers} layers "
                f"(need 0 <= start < end <= {num_layers})"
            )
        out[part] = (start, end)
    return out


def validate_against_model(config: PruneConfig, num_layers: int, num_kv_heads: int | None = None) -> None:
    """Checks that need the model's depth (from its config: done before the weights are loaded), on a config
    :func:`resolve_config` has checked."""
    ranges = layer_ranges(config, num_layers)
    if config.homogeneous:
        for part, (start, end) in ranges.items():
            if (start, end) != (0, num_layers):
                raise InvalidInputError(
                    f"{part}_layer_start/end: homogeneous prunes every layer to the same widths; the range "
                    f"[{start}, {end}) would leave the other layers of the {num_layers} whole")
    bad = [p for p in config.protected if p >= num_layers]
    if bad:
        raise InvalidInputError(f"protected: layers {bad} do not exist (the model has {num_layers} layers)")
    if num_kv_heads is not None and config.min_kv_groups > num_kv_heads:
        raise InvalidInputError(f"min_kv_groups: {config.min_kv_groups} exceeds the {num_kv_heads} KV heads per layer")


def resolve_config(config: PruneConfig, executor: str = "memory") -> PruneConfig:
    """``config`` with ``importance`` / ``layer_importance`` filled (DEFAULT_METHOD's where the run can take them,
    else FALLBACK_METHOD's), checked once for ``executor``; a config already resolved for it is returned as is."""
    if not isinstance(config, PruneConfig):
        raise InvalidInputError(f"config: expected a PruneConfig, got {type(config).__name__}")
    if executor not in EXECUTORS:
        raise InvalidInputError(f"executor: expected one of {', '.join(EXECUTORS)}, got {executor!r}")
    if config._resolved_for == executor:
        return config
    choices = [
        [getattr(config, name)] if getattr(config, name) is not None else [DEFAULT_METHOD[name], FALLBACK_METHOD[name]]
        for name in ("importance", "layer_importance")
    ]
    if config.mode == "flap" and config.importance is None:
        choices[0] = [FLAP_IMPORTANCE]  # FLAP chooses by its own fluctuation metric: the field is not read
    candidates = [dataclasses.replace(config, importance=i, layer_importance=li) for i in choices[0] for li in choices[1]]
    for candidate in candidates:
        try:
            _check_fields(candidate, executor)
        except InvalidInputError:
            continue
        object.__setattr__(candidate, "_resolved_for", executor)
        return candidate
    # none can run: the fallback-most candidate's reason is about what was asked, not about the default's needs
    _check_fields(candidates[-1], executor)
    raise AssertionError("unreachable: the last candidate failed its check above")


def validate_config(config: PruneConfig, executor: str = "memory") -> None:
    """Raise InvalidInputError, naming the field, when ``config`` cannot run on ``executor``."""
    resolve_config(config, executor)


def _check_layer_by_layer(config: PruneConfig) -> None:
    """Refuse, in one line, what the layer-by-layer executor cannot run: whole-model backwards. Every mode runs."""
    if config.allocation == "search":
        raise InvalidInputError("allocation search: runs in memory only (it swaps every layer's variants in and out of "
                                "one model); run without --sequential, or use --allocation solve")
    if config.mode != "flap" and config.importance in GRADIENT_KINDS:
        raise InvalidInputError(
            f"importance {config.importance!r} needs a backward pass through the whole model, which layer-by-layer "
            f"pruning (--sequential) never holds; use a forward-only importance ({', '.join(SEQUENTIAL_IMPORTANCE)}) "
            "or, for gradient scores of a model larger than one process's memory, the distributed Taylor path "
            "(torchrun --nproc-per-node N -m layerprune prune --fsdp: the backward sharded over the ranks)")
    if config.mode != "flap" and config.importance not in SEQUENTIAL_IMPORTANCE:
        raise InvalidInputError(f"importance {config.importance!r} is not available layer by layer (--sequential); "
                                f"use one of {', '.join(SEQUENTIAL_IMPORTANCE)}")
    if config.mode == "unbalanced" and config.layer_importance == "reconstruction":
        raise InvalidInputError(
            "layer importance 'reconstruction' weighs each layer's error by a Fisher from a backward pass through the "
            "whole model, which layer-by-layer pruning (--sequential) never holds; run it in memory (on a model "
            "larger than one process, the whole-model backward is sharded by torchrun ... --fsdp for gradient scores "
            f"only), or use one of {', '.join(SEQUENTIAL_LAYER_IMPORTANCE)} (sensitivity is the layer-by-layer default)")
    if config.mode == "unbalanced" and config.layer_importance not in SEQUENTIAL_LAYER_IMPORTANCE:
        raise InvalidInputError(f"layer importance {config.layer_importance!r} is not available layer by layer "
                                f"(--sequential); use one of {', '.join(SEQUENTIAL_LAYER_IMPORTANCE)}")


def solver_for(config: PruneConfig) -> str:
    """The allocation solver a config runs: ``homogeneous`` with ``config.homogeneous``, ``uniform`` in uniform
    mode, else ``config.solver`` (FLAP's own threshold is checked for feasibility with ``greedy``, which can
    reach every budget it can)."""
    if config.mode == "flap":
        return "greedy"
    if config.homogeneous:
        return "homogeneous"
    return "uniform" if config.mode == "uniform" else config.solver


def method_name(config: PruneConfig) -> str:
    """A short label: uniform-range, uniform-match, uniform-homogeneous, unbalanced-<importance>-<solver> (the
    solver is ``homogeneous`` with it), then +<refit> if any."""
    refit = "" if config.refit == "none" else f"+{config.refit}"
    refit += "+obs" if config.importance == "obs" else ""
    if config.mode == "flap":
        return "flap" + refit
    if config.mode == "uniform":
        if config.homogeneous:
            return "uniform-homogeneous" + refit
        return ("uniform-match" if config.match_params else "uniform-range") + refit
    search = "+search" if config.allocation == "search" else ""
    return f"unbalanced-{config.layer_importance}-{solver_for(config)}{search}{refit}"
