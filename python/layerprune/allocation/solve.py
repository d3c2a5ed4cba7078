"""Per-layer pruning allocation under an exact parameter budget.

A layer keeps ``g`` KV groups (one KV head and its ``r = Hq/Hkv`` query heads: q, k, v rows and
o_proj columns together) and ``f`` MLP channels (gate/up rows, down column). Parameters kept::

    attn(g) = d*hd*(2*r*g + 2*g) + qkv_bias*hd*(r*g + 2*g) + o_bias*d + qk_norm*2*hd + group_norm*hd*(r*g + g)
    mlp(f)  = 3*d*f + mlp_bias*(2*f + d)
    layer   = attn(g) + mlp(f) + norm_params ;  total = extra_params + sum(layer)

(:mod:`layerprune.arch.budget`; the o_proj / down_proj biases and per-head q/k norms are never pruned).

The budget removes ``T = round(ratio * total)`` parameters (a fraction of ALL parameters,
embeddings included), rounded half away from zero (:func:`target_count`: ratio 0.5 of 25
parameters is 13, as Rust's ``f64::round``). Solvers land in ``[T, T + granule]``, ``granule`` being
the smallest prunable step (one KV group or one ``mlp_step`` of channels); if the choices cannot
reach that window it widens to the largest step and ``"granularity"`` appears in ``binding``.

Two more budgets, alone, together or with ``ratio`` (which may then be None), are lower bounds:
``kv_cache_ratio`` (at least ``target_count(kv_cache_ratio, KV-cache bytes per token)`` removed) and
``flops_ratio`` (FLOPs per token of a forward over ``flops_seq_len`` positions); the formulas are
in :mod:`layerprune.arch.budget`. ``dp`` stays exact with them (a second dimension, see
``rust/src/alloc/bounds.rs``); ``greedy``/``lagrange`` meet them with penalty multipliers; ``uniform``
keeps one KV level that meets them (``homogeneous``: one pair of its window); ``seed`` and ``layer_rate`` refuse
them. A budget the constraints cannot meet, or a combination no allocation meets, raises
:class:`~layerprune.errors.InfeasibleError` naming the binding budgets.

Objective (minimised, additive over layers):

* curves: ``attn_curves[l][g]`` = estimated loss increase when layer ``l`` keeps ``g`` KV groups
  (length ``Hkv + 1``, normally ``curve[Hkv] = 0``); ``mlp_curves[l][j]`` = loss increase when it
  keeps ``min(j * mlp_step, I)`` channels (length ``ceil(I / mlp_step) + 1``);
* importance only: the convex surrogate ``loss_l(k) = importance_l * (1 - k)^2`` with ``k`` the
  kept fraction of the component (so greedy, lagrange and dp all apply).

Solvers (all in Rust, ``layerprune._core.allocate``; the GIL is released while solving):
``uniform`` (one rate, exact budget; or ``layer_rate`` with LLM-Pruner floor semantics), ``seed``
(the reference importance-to-rate mapping), ``greedy`` (marginal loss per parameter over unit
steps), ``lagrange`` (bisection on the multiplier, then greedy landing), ``dp`` (exact
multiple-choice knapsack), ``homogeneous`` (the same ``(g, f)`` in every layer, the least loss within
``[T, T + L * step]``, one step per layer: ties keep more KV groups, then fewer channels; no protected layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from layerprune import _core
from layerprune.arch.budget import LayerShape
from layerprune.errors import InvalidInputError

SOLVERS = ("uniform", "seed", "greedy", "lagrange", "dp", "homogeneous")
# How `dp` meets KV-cache / FLOPs bounds: the exact second dimension (falling back to the
# Lagrangian relaxation when it is too large), or either one alone.
DP_METHODS = ("auto", "second-dimension", "lagrangian")


def target_count(ratio: float, total: int) -> int:
    """A budget's target ``round(ratio * total)``, half away from zero (Rust's ``f64::round`` of the
    float product): ratio 0.5 of 25 parameters is 13, not 12. The one rounding rule of every budget."""
    x = float(ratio) * float(total)
    whole = math.floor(x)
    return int(whole) + (1 if x - whole >= 0.5 else 0)
# The solvers of unbalanced pruning (every one but `uniform`, and `homogeneous`, which `prune` runs by its own
# flag: PruneConfig.homogeneous).
UNBALANCED_SOLVERS = tuple(s for s in SOLVERS if s not in ("uniform", "homogeneous"))


@dataclass
class AllocationSpec:
    """An allocation problem. Rates are fractions REMOVED. ``min_rate``/``max_rate`` apply to
    attention and MLP unless ``min_attn_rate`` etc. are given. Layer ranges are half-open
    ``[start, end)``; layers outside a range keep that component whole (every solver).
    ``tie``: a layer's kept MLP fraction stays within half a KV group of its kept KV-group
    fraction, ``|f/I - g/Hkv| <= 1/(2*Hkv)``. ``layer_rate`` switches ``uniform`` to LLM-Pruner
    semantics. ``log_transform``, ``alpha``, ``min_effective_rate``: ``seed`` options.
    Budgets: ``ratio`` (parameters, may be None when another budget is given), ``kv_cache_ratio``
    and ``flops_ratio`` (lower bounds on the KV-cache bytes / FLOPs per token removed, at
    ``kv_cache_dtype_bytes`` per element and ``flops_seq_len`` positions; ``extra_flops`` is the
    ``lm_head``'s share). ``dp_method``: one of :data:`DP_METHODS`."""

    ratio: float | None
    layers: list[LayerShape]
    extra_params: int = 0
    importance: npt.NDArray[np.float64] | None = None
    attn_importance: npt.NDArray[np.float64] | None = None
    mlp_importance: npt.NDArray[np.float64] | None = None
    attn_curves: list[npt.NDArray[np.float64]] | None = None
    mlp_curves: list[npt.NDArray[np.float64]] | None = None
    mlp_step: int = 1
    min_kv_groups: int = 1
    min_mlp: int | None = None
    protected: tuple[int, ...] = ()
    min_rate: float = 0.0
    max_rate: float = 1.0
    min_attn_rate: float | None = None
    max_attn_rate: float | None = None
    min_mlp_rate: float | None = None
    max_mlp_rate: float | None = None
    tie: bool = False
    attn_layer_start: int | None = None
    attn_layer_end: int | None = None
    mlp_layer_start: int | None = None
    mlp_layer_end: int | None = None
    min_effective_rate: float = 0.0
    layer_rate: float | None = None
    log_transform: bool = False
    alpha: float = 1.0
    kv_cache_ratio: float | None = None
    flops_ratio: float | None = None
    flops_seq_len: int = 2048
    kv_cache_dtype_bytes: int = 2
    extra_flops: int = 0
    dp_method: str = "auto"

    @property
    def params_layers(self) -> int:
        """Parameters of all decoder layers (unpruned)."""
        return sum(s.params() for s in self.layers)

    @property
    def params_total(self) -> int:
        """All model parameters: decoder layers plus ``extra_params``."""
        return self.params_layers + self.extra_params

    @property
    def kv_cache_bytes_total(self) -> int:
        """KV-cache bytes per token of the unpruned model."""
        return sum(s.kv_cache_bytes(dtype_bytes=self.kv_cache_dtype_bytes) for s in self.layers)

    @property
    def flops_total(self) -> int:
        """FLOPs per token of the unpruned model at ``flops_seq_len`` positions, ``extra_flops`` included."""
        return self.extra_flops + sum(s.flops(seq_len=self.flops_seq_len) for s in self.layers)


@dataclass(frozen=True)
class LayerAllocation:
    """What one layer keeps; rates are fractions removed."""

    kv_groups_kept: int
    q_heads_kept: int
    mlp_kept: int
    attn_rate: float
    mlp_rate: float
    params_kept: int


@dataclass(frozen=True)
class AllocationResult:
    """A solver's answer. ``actual_ratio``: removed fraction of all parameters;
    ``actual_ratio_layers``: removed fraction of decoder-layer parameters. ``target_removed``
    and ``granule`` give the budget window ``[target_removed, target_removed + granule]``
    (``target_removed`` is None without a parameter budget). ``actual_kv_cache_ratio`` and
    ``actual_flops_ratio``: removed fractions of the KV-cache bytes and FLOPs per token (always
    reported). ``lower_bound``: a certified lower bound on the optimum (``dp``; NaN otherwise);
    ``proven_optimal``: it equals ``objective``."""

    layers: list[LayerAllocation]
    params_before: int
    params_after: int
    actual_ratio: float
    actual_ratio_layers: float
    objective: float
    solver: str
    solve_seconds: float
    binding: list[str]
    target_removed: int | None = 0
    granule: int = 0
    notes: list[str] = field(default_factory=list)
    kv_cache_bytes_before: int = 0
    kv_cache_bytes_after: int = 0
    actual_kv_cache_ratio: float = 0.0
    flops_before: int = 0
    flops_after: int = 0
    actual_flops_ratio: float = 0.0
    flops_seq_len: int = 0
    target_kv_cache_removed: int | None = None
    target_flops_removed: int | None = None
    lower_bound: float = math.nan
    proven_optimal: bool = False

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [
                {
                    "kv_groups_kept": la.kv_groups_kept,
                    "q_heads_kept": la.q_heads_kept,
                    "mlp_kept": la.mlp_kept,
                    "attn_rate": la.attn_rate,
                    "mlp_rate": la.mlp_rate,
                    "params_kept": la.params_kept,
                }
                for la in self.layers
            ],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "actual_ratio": self.actual_ratio,
            "actual_ratio_layers": self.actual_ratio_layers,
            "objective": self.objective if math.isfinite(self.objective) else None,  # FLAP has none: null, not NaN
            "solver": self.solver,
            "solve_seconds": self.solve_seconds,
            "binding": list(self.binding),
            "target_removed": self.target_removed,
            "granule": self.granule,
            "notes": list(self.notes),
            "kv_cache_bytes_before": self.kv_cache_bytes_before,
            "kv_cache_bytes_after": self.kv_cache_bytes_after,
            "actual_kv_cache_ratio": self.actual_kv_cache_ratio,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "actual_flops_ratio": self.actual_flops_ratio,
            "flops_seq_len": self.flops_seq_len,
            "target_kv_cache_removed": self.target_kv_cache_removed,
            "target_flops_removed": self.target_flops_removed,
            "lower_bound": None if math.isnan(self.lower_bound) else self.lower_bound,
            "proven_optimal": self.proven_optimal,
        }


def f64_array(name: str, a: Any) -> npt.NDArray[np.float64]:
    try:
        arr = np.ascontiguousarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{name}: not an array of numbers ({exc})") from None
    if arr.ndim != 1:
        raise InvalidInputError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def _shapes_array(layers: list[LayerShape]) -> npt.NDArray[np.int64]:
    if not layers:
        raise InvalidInputError("layers: at least one layer is required")
    rows = []
    for i, s in enumerate(layers):
        if not isinstance(s, LayerShape):
            raise InvalidInputError(f"layers[{i}]: expected a LayerShape, got {type(s).__name__}")
        rows.append(s.row())
    return np.asarray(rows, dtype=np.int64)


def allocate(spec: AllocationSpec, solver: str = "dp") -> AllocationResult:
    """Solve ``spec`` with ``solver`` (one of :data:`SOLVERS`). Raises InvalidInputError for bad
    fields (the message names the field) and InfeasibleError for a budget the constraints
    cannot meet."""
    if solver not in SOLVERS:
        raise InvalidInputError(f"solver: unknown solver {solver!r} (expected one of {', '.join(SOLVERS)})")
    if spec.dp_method not in DP_METHODS:
        raise InvalidInputError(f"dp_method: unknown method {spec.dp_method!r} (expected one of {', '.join(DP_METHODS)})")

    def budget(name: str, value: float | None) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise InvalidInputError(f"{name}: must be a number in [0, 1) or None, got {value!r}")
        return float(value)

    if spec.importance is not None and (spec.attn_importance is not None or spec.mlp_importance is not None):
        raise InvalidInputError("importance: give either importance or attn_importance/mlp_importance, not both")
    attn_imp = spec.attn_importance if spec.attn_importance is not None else spec.importance
    mlp_imp = spec.mlp_importance if spec.mlp_importance is not None else spec.importance

    def pick(specific: float | None, shared: float) -> float:
        return float(shared if specific is None else specific)

    out = _core.allocate(
        _shapes_array(list(spec.layers)),
        budget("ratio", spec.ratio),
        solver,
        kv_cache_ratio=budget("kv_cache_ratio", spec.kv_cache_ratio),
        flops_ratio=budget("flops_ratio", spec.flops_ratio),
        flops_seq_len=int(spec.flops_seq_len),
        kv_cache_dtype_bytes=int(spec.kv_cache_dtype_bytes),
        extra_flops=int(spec.extra_flops),
        dp_method=str(spec.dp_method),
        extra_params=int(spec.extra_params),
        attn_importance=None if attn_imp is None else f64_array("attn_importance", attn_imp),
        mlp_importance=None if mlp_imp is None else f64_array("mlp_importance", mlp_imp),
        attn_curves=None if spec.attn_curves is None else [f64_array(f"attn_curves[{i}]", c) for i, c in enumerate(spec.attn_curves)],
        mlp_curves=None if spec.mlp_curves is None else [f64_array(f"mlp_curves[{i}]", c) for i, c in enumerate(spec.mlp_curves)],
        mlp_step=int(spec.mlp_step),
        min_kv_groups=int(spec.min_kv_groups),
        min_mlp=None if spec.min_mlp is None else int(spec.min_mlp),
        protected=[int(p) for p in spec.protected],
        min_attn_rate=pick(spec.min_attn_rate, spec.min_rate),
        max_attn_rate=pick(spec.max_attn_rate, spec.max_rate),
        min_mlp_rate=pick(spec.min_mlp_rate, spec.min_rate),
        max_mlp_rate=pick(spec.max_mlp_rate, spec.max_rate),
        tie=bool(spec.tie),
        attn_layer_start=spec.attn_layer_start,
        attn_layer_end=spec.attn_layer_end,
        mlp_layer_start=spec.mlp_layer_start,
        mlp_layer_end=spec.mlp_layer_end,
        min_effective_rate=float(spec.min_effective_rate),
        layer_rate=None if spec.layer_rate is None else float(spec.layer_rate),
        log_transform=bool(spec.log_transform),
        alpha=float(spec.alpha),
    )
    layers = [
        LayerAllocation(int(g), int(q), int(f), float(ar), float(mr), int(pk))
        for g, q, f, ar, mr, pk in zip(
            out["kv_groups_kept"], out["q_heads_kept"], out["mlp_kept"], out["attn_rate"], out["mlp_rate"], out["params_kept"]
        )
    ]
    return AllocationResult(
        layers=layers,
        params_before=int(out["params_before"]),
        params_after=int(out["params_after"]),
        actual_ratio=float(out["actual_ratio"]),
        actual_ratio_layers=float(out["actual_ratio_layers"]),
        objective=float(out["objective"]),
        solver=str(out["solver"]),
        solve_seconds=float(out["solve_seconds"]),
        binding=list(out["binding"]),
        target_removed=None if out["target_removed"] is None else int(out["target_removed"]),
        granule=int(out["granule"]),
        notes=list(out["notes"]),
        kv_cache_bytes_before=int(out["kv_cache_bytes_before"]),
        kv_cache_bytes_after=int(out["kv_cache_bytes_after"]),
        actual_kv_cache_ratio=float(out["actual_kv_cache_ratio"]),
        flops_before=int(out["flops_before"]),
        flops_after=int(out["flops_after"]),
        actual_flops_ratio=float(out["actual_flops_ratio"]),
        flops_seq_len=int(out["flops_seq_len"]),
        target_kv_cache_removed=None if out["target_kv_cache_removed"] is None else int(out["target_kv_cache_removed"]),
        target_flops_removed=None if out["target_flops_removed"] is None else int(out["target_flops_removed"]),
        lower_bound=float(out["lower_bound"]),
        proven_optimal=bool(out["proven_optimal"]),
    )


__all__ = [
    "DP_METHODS", "SOLVERS", "UNBALANCED_SOLVERS", "AllocationResult", "AllocationSpec", "LayerAllocation", "LayerShape",
    "allocate", "target_count",
]  # fmt: skip
