"""Per-layer pruning allocation under an exact parameter budget.

A layer keeps ``g`` KV groups (one KV head and its ``r = Hq/Hkv`` query heads: q, k, v rows and
o_proj columns together) and ``f`` MLP channels (gate/up rows, down column). Parameters kept::

    attn(g) = d*hd*(2*r*g + 2*g) [+ hd*(r*g + 2*g) + d  with attention bias; o bias never pruned]
    mlp(f)  = 3*d*f              [+ 2*f + d             with MLP bias; down bias never pruned]
    layer   = attn(g) + mlp(f) + norm_params ;  total = extra_params + sum(layer)

The budget removes ``T = round(ratio * total)`` parameters (a fraction of ALL parameters,
embeddings included). Solvers land in ``[T, T + granule]``, ``granule`` being the smallest
prunable step (one KV group or one ``mlp_step`` of channels); if the choices cannot reach that
window it widens to the largest step and ``"granularity"`` appears in ``binding``. A budget the
constraints cannot meet raises :class:`~layerprune.errors.InfeasibleError`.

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
multiple-choice knapsack).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import numpy.typing as npt

from layerprune import _core
from layerprune.errors import InvalidInputError

SOLVERS = ("uniform", "seed", "greedy", "lagrange", "dp")


@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer. ``norm_params``: its norm weights (never pruned)."""

    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    attn_bias: bool = False
    mlp_bias: bool = False
    norm_params: int = 0

    def params(self, kv_groups: int | None = None, mlp: int | None = None) -> int:
        """Parameters of the layer keeping ``kv_groups`` KV groups and ``mlp`` channels (default: all)."""
        g = self.num_kv_heads if kv_groups is None else kv_groups
        f = self.intermediate if mlp is None else mlp
        r = self.num_q_heads // self.num_kv_heads
        d, hd = self.hidden, self.head_dim
        attn = d * hd * (2 * r * g + 2 * g) + ((hd * (r * g + 2 * g) + d) if self.attn_bias else 0)
        mlp_p = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        return attn + mlp_p + self.norm_params


@dataclass
class AllocationSpec:
    """An allocation problem. Rates are fractions REMOVED. ``min_rate``/``max_rate`` apply to
    attention and MLP unless ``min_attn_rate`` etc. are given. Layer ranges are half-open
    ``[start, end)``; layers outside a range keep that component whole (every solver).
    ``tie``: a layer's kept MLP fraction stays within half a KV group of its kept KV-group
    fraction, ``|f/I - g/Hkv| <= 1/(2*Hkv)``. ``layer_rate`` switches ``uniform`` to LLM-Pruner
    semantics. ``log_transform``, ``alpha``, ``min_effective_rate``: ``seed`` options."""

    ratio: float
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

    @property
    def params_layers(self) -> int:
        """Parameters of all decoder layers (unpruned)."""
        return sum(s.params() for s in self.layers)

    @property
    def params_total(self) -> int:
        """All model parameters: decoder layers plus ``extra_params``."""
        return self.params_layers + self.extra_params


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
    and ``granule`` give the budget window ``[target_removed, target_removed + granule]``."""

    layers: list[LayerAllocation]
    params_before: int
    params_after: int
    actual_ratio: float
    actual_ratio_layers: float
    objective: float
    solver: str
    solve_seconds: float
    binding: list[str]
    target_removed: int = 0
    granule: int = 0
    notes: list[str] = field(default_factory=list)

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
            "objective": self.objective,
            "solver": self.solver,
            "solve_seconds": self.solve_seconds,
            "binding": list(self.binding),
            "target_removed": self.target_removed,
            "granule": self.granule,
            "notes": list(self.notes),
        }


def _f64(name: str, a: Any) -> npt.NDArray[np.float64]:
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
        rows.append(
            [s.hidden, s.num_q_heads, s.num_kv_heads, s.head_dim, s.intermediate, int(s.attn_bias), int(s.mlp_bias), s.norm_params]
        )
    return np.asarray(rows, dtype=np.int64)


def allocate(spec: AllocationSpec, solver: str = "dp") -> AllocationResult:
    """Solve ``spec`` with ``solver`` (one of :data:`SOLVERS`). Raises InvalidInputError for bad
    fields (the message names the field) and InfeasibleError for a budget the constraints
    cannot meet."""
    if solver not in SOLVERS:
        raise InvalidInputError(f"solver: unknown solver {solver!r} (expected one of {', '.join(SOLVERS)})")
    if spec.importance is not None and (spec.attn_importance is not None or spec.mlp_importance is not None):
        raise InvalidInputError("importance: give either importance or attn_importance/mlp_importance, not both")
    attn_imp = spec.attn_importance if spec.attn_importance is not None else spec.importance
    mlp_imp = spec.mlp_importance if spec.mlp_importance is not None else spec.importance

    def pick(specific: float | None, shared: float) -> float:
        return float(shared if specific is None else specific)

    out = _core.allocate(
        _shapes_array(list(spec.layers)),
        float(spec.ratio),
        solver,
        extra_params=int(spec.extra_params),
        attn_importance=None if attn_imp is None else _f64("attn_importance", attn_imp),
        mlp_importance=None if mlp_imp is None else _f64("mlp_importance", mlp_imp),
        attn_curves=None if spec.attn_curves is None else [_f64(f"attn_curves[{i}]", c) for i, c in enumerate(spec.attn_curves)],
        mlp_curves=None if spec.mlp_curves is None else [_f64(f"mlp_curves[{i}]", c) for i, c in enumerate(spec.mlp_curves)],
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
        target_removed=int(out["target_removed"]),
        granule=int(out["granule"]),
        notes=list(out["notes"]),
    )


# ------------------------------------------------------------------------------------------
# specs from model configs and JSON
# ------------------------------------------------------------------------------------------


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def spec_from_model_config(config: Any, ratio: float, **constraints: Any) -> AllocationSpec:
    """An :class:`AllocationSpec` for a Llama-family model from its transformers config (or the
    ``config.json`` dict). Parameters are counted like ``model.parameters()``: token embeddings,
    ``lm_head`` unless ``tie_word_embeddings``, the final RMSNorm (``extra_params``), and per layer
    two RMSNorms (``norm_params = 2 * hidden``), q/k/v/o and gate/up/down with their biases.
    ``constraints`` are further AllocationSpec fields (importance, mlp_step, protected, ...)."""
    try:
        hidden = int(_cfg(config, "hidden_size"))
        n_layers = int(_cfg(config, "num_hidden_layers"))
        heads = int(_cfg(config, "num_attention_heads"))
        kv = int(_cfg(config, "num_key_value_heads", heads))
        head_dim = int(_cfg(config, "head_dim", hidden // heads if heads else 0))
        inter = int(_cfg(config, "intermediate_size"))
        vocab = int(_cfg(config, "vocab_size"))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"config: missing or non-integer Llama field ({exc})") from None
    tied = bool(_cfg(config, "tie_word_embeddings", False))
    attn_bias = bool(_cfg(config, "attention_bias", False))
    mlp_bias = bool(_cfg(config, "mlp_bias", False))
    layer = LayerShape(hidden, heads, kv, head_dim, inter, attn_bias, mlp_bias, norm_params=2 * hidden)
    extra = vocab * hidden * (1 if tied else 2) + hidden
    unknown = set(constraints) - set(AllocationSpec.__dataclass_fields__)
    if unknown:
        raise InvalidInputError(f"constraints: unknown field(s) {sorted(unknown)}")
    return AllocationSpec(ratio=float(ratio), layers=[layer] * n_layers, extra_params=extra, **constraints)


_SHAPE_KEYS = ("hidden", "num_q_heads", "num_kv_heads", "head_dim", "intermediate")
_PER_LAYER_ARRAYS = (("importance", "importance"), ("attn_importance", "attn_importance"), ("mlp_importance", "mlp_importance"))
_SCALAR_FIELDS = (
    "extra_params", "mlp_step", "min_kv_groups", "min_mlp", "min_rate", "max_rate", "min_attn_rate", "max_attn_rate",
    "min_mlp_rate", "max_mlp_rate", "tie", "attn_layer_start", "attn_layer_end", "mlp_layer_start", "mlp_layer_end",
    "min_effective_rate", "layer_rate", "log_transform", "alpha",
)  # fmt: skip


def spec_from_json(data: Mapping[str, Any]) -> AllocationSpec:
    """Build a spec from its JSON form (see :func:`spec_to_json`)."""
    if not isinstance(data, Mapping):
        raise InvalidInputError("spec: expected a JSON object")
    known = {"ratio", "layers", "protected", "importance", "attn_importance", "mlp_importance", *_SCALAR_FIELDS}
    unknown = set(data) - known
    if unknown:
        raise InvalidInputError(f"spec: unknown field(s) {sorted(unknown)}")
    if "ratio" not in data:
        raise InvalidInputError("ratio: missing")
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise InvalidInputError("layers: expected a non-empty list of layer objects")
    layers: list[LayerShape] = []
    per_layer: dict[str, list[Any]] = {}
    for i, obj in enumerate(raw_layers):
        if not isinstance(obj, Mapping):
            raise InvalidInputError(f"layers[{i}]: expected an object")
        missing = [k for k in _SHAPE_KEYS if k not in obj]
        if missing:
            raise InvalidInputError(f"layers[{i}].{missing[0]}: missing")
        try:
            layers.append(
                LayerShape(
                    *(int(obj[k]) for k in _SHAPE_KEYS),
                    attn_bias=bool(obj.get("attn_bias", False)),
                    mlp_bias=bool(obj.get("mlp_bias", False)),
                    norm_params=int(obj.get("norm_params", 0)),
                )
            )
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"layers[{i}]: shape fields must be integers ({exc})") from None
        for key in ("importance", "attn_importance", "mlp_importance", "attn_curve", "mlp_curve"):
            if key in obj:
                per_layer.setdefault(key, [None] * len(raw_layers))[i] = obj[key]
    kwargs: dict[str, Any] = {k: data[k] for k in _SCALAR_FIELDS if k in data}
    for key, target in _PER_LAYER_ARRAYS:
        if key in data:
            kwargs[target] = _f64(key, data[key])
    for key in ("importance", "attn_importance", "mlp_importance"):
        if key in per_layer:
            values = per_layer[key]
            if any(v is None for v in values):
                raise InvalidInputError(f"layers[{values.index(None)}].{key}: missing (other layers have it)")
            kwargs[key] = _f64(key, values)
    for key, target in (("attn_curve", "attn_curves"), ("mlp_curve", "mlp_curves")):
        if key in per_layer:
            values = per_layer[key]
            if any(v is None for v in values):
                raise InvalidInputError(f"layers[{values.index(None)}].{key}: missing (other layers have it)")
            kwargs[target] = [_f64(f"layers[{i}].{key}", v) for i, v in enumerate(values)]
    if "protected" in data:
        kwargs["protected"] = tuple(int(p) for p in data["protected"])
    try:
        return AllocationSpec(ratio=float(data["ratio"]), layers=layers, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"spec: {exc}") from None


def load_spec(path: str | os.PathLike[str]) -> AllocationSpec:
    """Read a spec JSON file (format of :func:`spec_to_json`)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"spec: file {p} not found") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"spec: cannot read {p}: {exc}") from None
    return spec_from_json(data)


def spec_to_json(spec: AllocationSpec) -> dict[str, Any]:
    """The JSON form of a spec: ``ratio``, ``layers`` (shape fields plus per-layer
    ``importance``/``attn_importance``/``mlp_importance``/``attn_curve``/``mlp_curve``),
    ``protected`` and every other field at top level."""
    layers = []
    for i, s in enumerate(spec.layers):
        obj: dict[str, Any] = {
            "hidden": s.hidden,
            "num_q_heads": s.num_q_heads,
            "num_kv_heads": s.num_kv_heads,
            "head_dim": s.head_dim,
            "intermediate": s.intermediate,
            "attn_bias": s.attn_bias,
            "mlp_bias": s.mlp_bias,
            "norm_params": s.norm_params,
        }
        for key in ("importance", "attn_importance", "mlp_importance"):
            arr = getattr(spec, key)
            if arr is not None:
                obj[key] = float(np.asarray(arr, dtype=np.float64)[i])
        if spec.attn_curves is not None:
            obj["attn_curve"] = [float(v) for v in spec.attn_curves[i]]
        if spec.mlp_curves is not None:
            obj["mlp_curve"] = [float(v) for v in spec.mlp_curves[i]]
        layers.append(obj)
    out: dict[str, Any] = {"ratio": spec.ratio, "layers": layers, "protected": [int(p) for p in spec.protected]}
    for key in _SCALAR_FIELDS:
        out[key] = getattr(spec, key)
    return out


__all__ = [
    "SOLVERS",
    "AllocationResult",
    "AllocationSpec",
    "LayerAllocation",
    "LayerShape",
    "allocate",
    "load_spec",
    "spec_from_json",
    "spec_from_model_config",
    "spec_to_json",
]
