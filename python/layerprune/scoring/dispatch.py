"""Kernel dispatch for element scores: fused Taylor / magnitude kernels and activation stats.

`weight_scores` computes, in ONE pass over a 2-D weight W (and its gradient G / Fisher diagonal
H), an elementwise score reduced per output row (axis=0) or per input column (axis=1) and
summed over groups of `group_size` consecutive rows/columns (a head of `head_dim`, or 1 for
single channels). Kinds and formulas: see `layerprune.scoring.reference`. Arithmetic is
float32 whatever the storage dtype (float32, bfloat16, float16).

Backends: `triton` (CUDA tensors; `layerprune.kernels`), `rust` (CPU tensors, multithreaded,
reads tensor memory in place, GIL released), `torch` (plain reference, any device, the fallback).
`auto` picks triton on CUDA when triton is installed, rust on CPU for contiguous tensors of a
supported dtype when the compiled extension is importable, torch otherwise.
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np
import torch

from layerprune import distributed
from layerprune.errors import InvalidInputError
from layerprune.scoring.reference import (
    NEEDS_FISHER,
    NEEDS_GRAD,
    SCORE_KINDS,
    channel_sums_reference,
    weight_scores_reference,
)

BACKENDS: tuple[str, ...] = ("auto", "triton", "rust", "torch")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

__all__ = [
    "BACKENDS",
    "SCORE_KINDS",
    "ActivationStats",
    "available_backends",
    "flap_channel_scores",
    "wanda_channel_scores",
    "weight_scores",
]


@functools.cache
def _rust_core() -> ModuleType | None:
    """The compiled extension, or None when it is not built (e.g. on a GPU box without Rust)."""
    try:
        from layerprune import _core
    except ImportError:
        return None
    return _core if hasattr(_core, "weight_scores") else None


@functools.cache
def _triton_ok() -> bool:
    from layerprune.kernels import HAS_TRITON

    return HAS_TRITON


def available_backends() -> list[str]:
    """Backends usable in this process (torch always)."""
    out = ["torch"]
    if _rust_core() is not None:
        out.append("rust")
    if _triton_ok():
        out.append("triton")
    return out


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor; 16-bit floats as their uint16 bits."""
    t = t.detach()
    if t.dtype == torch.float32:
        return t.numpy()
    return t.view(torch.int16).numpy().view(np.uint16)


def _check_inputs(weight, grad, fisher, kind, axis, group_size) -> None:
    if kind not in SCORE_KINDS:
        raise InvalidInputError(f"kind: unknown score kind {kind!r}; expected one of {', '.join(SCORE_KINDS)}")
    if axis not in (0, 1):
        raise InvalidInputError(f"axis: must be 0 (one score per row) or 1 (one per column), got {axis!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise InvalidInputError(f"weight: expected a 2-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype not in _DTYPE_NAMES:
        raise InvalidInputError(f"weight: dtype {weight.dtype} not supported (float32, bfloat16, float16)")
    for name, t, needed in (("grad", grad, kind in NEEDS_GRAD), ("fisher", fisher, kind in NEEDS_FISHER)):
        if t is None:
            if needed:
                what = "a gradient" if name == "grad" else "the Fisher diagonal (accumulated squared gradients)"
                raise InvalidInputError(f"{name}: score kind {kind!r} needs {what}")
            continue
        if t.shape != weight.shape:
            raise InvalidInputError(f"{name}: shape {tuple(t.shape)} differs from weight shape {tuple(weight.shape)}")
        if t.device != weight.device:
            raise InvalidInputError(f"{name}: on {t.device}, weight on {weight.device}")
    n = weight.shape[0] if axis == 0 else weight.shape[1]
    if not isinstance(group_size, int) or group_size <= 0 or n % group_size:
        raise InvalidInputError(f"group_size: must be a positive divisor of {n}, got {group_size!r}")


def _resolve_backend(backend: str, tensors: list[torch.Tensor]) -> str:
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        if backend == "rust" and _rust_core() is None:
            raise InvalidInputError("backend: 'rust' requested but layerprune._core is not built")
        if backend == "rust" and tensors[0].device.type != "cpu":
            raise InvalidInputError(f"backend: 'rust' needs CPU tensors, got {tensors[0].device}")
        if backend == "triton" and not _triton_ok():
            raise InvalidInputError("backend: 'triton' requested but triton is not installed")
        return backend
    device = tensors[0].device
    if device.type == "cuda" and _triton_ok():
        return "triton"
    same_dtype = all(t.dtype == tensors[0].dtype for t in tensors)
    if device.type == "cpu" and same_dtype and _rust_core() is not None and all(t.is_contiguous() for t in tensors):
        return "rust"
    return "torch"


def weight_scores(
    weight: torch.Tensor,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    *,
    kind: str = "taylor",
    axis: int = 0,
    group_size: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused importance score of a 2-D weight: float32 tensor of length n / group_size.

    axis=0 gives one score per output row (rows of `weight`), axis=1 one per input column.
    `grad` is needed by taylor / vectorize / taylor-mix, `fisher` by taylor2 / taylor-mix.
    """
    _check_inputs(weight, grad, fisher, kind, axis, group_size)
    present = [t for t in (weight, grad, fisher) if t is not None]
    chosen = _resolve_backend(backend, present)
    if chosen == "torch":
        return weight_scores_reference(weight, grad, fisher, kind=kind, axis=axis, group_size=group_size)
    if chosen == "triton":
        from layerprune.kernels.weight_scores import weight_scores_triton

        return weight_scores_triton(weight, grad, fisher, kind=kind, axis=axis, group_size=group_size)
    # rust: one storage dtype for all inputs (mixed dtypes are widened to float32), contiguous
    dtype = weight.dtype if all(t.dtype == weight.dtype for t in present) else torch.float32
    views = [_numpy_view(t.to(dtype).contiguous()) if t is not None else None for t in (weight, grad, fisher)]
    out = _rust_core().weight_scores(
        views[0], views[1], views[2], kind=kind, axis=axis, group_size=group_size, dtype=_DTYPE_NAMES[dtype]
    )
    return torch.from_numpy(out)


def _channel_sums(x2d: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = _resolve_backend(backend, [x2d])
    if chosen == "triton":
        from layerprune.kernels.activation_stats import channel_sums_triton

        return channel_sums_triton(x2d)
    if chosen == "rust" and x2d.dtype in _DTYPE_NAMES:
        s, q = _rust_core().channel_sums(_numpy_view(x2d.contiguous()), dtype=_DTYPE_NAMES[x2d.dtype])
        return torch.from_numpy(s), torch.from_numpy(q)
    return channel_sums_reference(x2d)


class ActivationStats:
    """Per-channel count / sum / sum of squares of a layer input [..., channels], over batches.

    Each `update` reduces one batch in one pass (float32 within the batch); batches are added
    into float64 totals. `mean`, `var` (population variance, E[x²] − E[x]², clamped at 0) and
    `l2` (‖X_j‖₂ = sqrt(Σ x²) over every token seen: Wanda's input norm) are float32 tensors;
    `count` is the number of tokens (rows) seen.
    """

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend
        self.count = 0
        self._sum: torch.Tensor | None = None
        self._sumsq: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise InvalidInputError("x: expected a tensor of shape [..., channels]")
        x2d = x.detach().reshape(-1, x.shape[-1])
        if self._sum is not None and x2d.shape[1] != self._sum.numel():
            raise InvalidInputError(f"x: has {x2d.shape[1]} channels, earlier batches had {self._sum.numel()}")
        s, q = _channel_sums(x2d, self.backend)
        if self._sum is None:
            self._sum = torch.zeros(x2d.shape[1], dtype=torch.float64, device=s.device)
            self._sumsq = torch.zeros_like(self._sum)
        self._sum += s.to(self._sum.device, torch.float64)
        self._sumsq += q.to(self._sum.device, torch.float64)
        self.count += x2d.shape[0]

    def _need(self) -> None:
        if self._sum is None or self.count == 0:
            raise InvalidInputError("ActivationStats: no batch seen yet (call update first)")

    @staticmethod
    def all_reduce(stats: list[ActivationStats]) -> None:
        """Sum the counts, Σx and Σx² of ``stats`` (the same list, in the same order, on every rank) over the
        data-parallel ranks, each of which saw its own samples; nothing in one process."""
        if distributed.active() is None:
            return
        for st in stats:
            st._need()
        counts = torch.tensor([float(st.count) for st in stats], dtype=torch.float64)
        distributed.all_reduce_sum_([t for st in stats for t in (st._sum, st._sumsq)] + [counts])
        for st, n in zip(stats, counts.tolist()):
            st.count = int(n)

    @property
    def sum(self) -> torch.Tensor:
        self._need()
        return self._sum.float()

    @property
    def sumsq(self) -> torch.Tensor:
        self._need()
        return self._sumsq.float()

    @property
    def mean(self) -> torch.Tensor:
        self._need()
        return (self._sum / self.count).float()

    @property
    def var(self) -> torch.Tensor:
        self._need()
        m = self._sum / self.count
        return (self._sumsq / self.count - m * m).clamp_min(0.0).float()

    @property
    def l2(self) -> torch.Tensor:
        self._need()
        return self._sumsq.sqrt().float()


def _stats_for(weight: torch.Tensor, stats: ActivationStats) -> None:
    stats._need()
    if weight.dim() != 2 or stats._sum.numel() != weight.shape[1]:
        raise InvalidInputError(
            f"stats: has {stats._sum.numel()} channels, weight has {weight.shape[1] if weight.dim() == 2 else '?'} input columns"
        )


def wanda_channel_scores(
    weight: torch.Tensor, stats: ActivationStats, *, axis: int = 1, group_size: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """Structured Wanda (Sun et al. 2023): sums of |W_ij|·‖X_j‖₂ over the pruned structure.

    axis=1: per input column j, ‖X_j‖·Σ_i |W_ij|; axis=0: per output row i, Σ_j |W_ij|·‖X_j‖.
    `stats` must hold the statistics of this layer's input. Summed over groups of `group_size`.
    """
    _stats_for(weight, stats)
    norm = stats.l2.to(weight.device)
    if axis == 1:
        per_col = weight_scores(weight, kind="l1", axis=1, backend=backend).to(norm.device) * norm
        _check_inputs(weight, None, None, "l1", 1, group_size)
        return per_col.view(-1, group_size).sum(1)
    _check_inputs(weight, None, None, "l1", axis, group_size)
    per_row = weight.detach().abs().float() @ norm
    return per_row.view(-1, group_size).sum(1)


def flap_channel_scores(
    weight: torch.Tensor, stats: ActivationStats, *, group_size: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """FLAP fluctuation metric (An et al. 2024) per input column j: Var(X_j)·‖W[:, j]‖₂².

    `stats` holds this layer's input statistics; scores are summed over groups of `group_size`
    columns (a head of head_dim for o_proj, 1 for down_proj channels).
    """
    _stats_for(weight, stats)
    _check_inputs(weight, None, None, "l2", 1, group_size)
    per_col = weight_scores(weight, kind="l2", axis=1, backend=backend).to(stats._sum.device) * stats.var
    return per_col.view(-1, group_size).sum(1)

