"""Shared inputs and the ONE tolerance table for the scoring-kernel tests (Rust, Triton, torch).

Kernels and reference read the same stored values and both accumulate in float32, so the only
differences are summation order; the table bounds them per storage dtype, relative to the
magnitude of the summed terms (vectorize may cancel to ~0, so |sum| alone is no scale).
"""

from __future__ import annotations

import torch

from layerprune.scoring.reference import SCORE_KINDS, weight_scores_reference

# dtype -> (atol, rtol); atol is relative to the sum of |terms| in each output element
RESOLUTION: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-6, 1e-5),
    torch.bfloat16: (4e-6, 2e-5),
    torch.float16: (4e-6, 2e-5),
}

DTYPES = tuple(RESOLUTION)


def make_inputs(rows: int, cols: int, dtype: torch.dtype, seed: int = 0):
    """Weight, gradient and a positive Fisher diagonal with LLM-like spreads."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    g = torch.randn(rows, cols, generator=gen) * 1e-2
    h = torch.randn(rows, cols, generator=gen).square() * 1e-3
    return w.to(dtype), g.to(dtype), h.to(dtype)


def magnitude(w, g, h, kind: str, axis: int, group_size: int) -> torch.Tensor:
    """Sum of |terms| per output element: the scale the tolerance is relative to."""
    if kind == "vectorize":
        kind = "taylor"
    return weight_scores_reference(w, g, h, kind=kind, axis=axis, group_size=group_size)


def assert_scores_close(got: torch.Tensor, w, g, h, *, kind: str, axis: int, group_size: int, ctx: str = "") -> None:
    want = weight_scores_reference(w, g, h, kind=kind, axis=axis, group_size=group_size)
    assert got.dtype == torch.float32, ctx
    assert got.shape == want.shape, f"{ctx}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    atol, rtol = RESOLUTION[w.dtype]
    mag = magnitude(w, g, h, kind, axis, group_size)
    err = (got.cpu() - want).abs()
    bound = atol * mag + rtol * want.abs() + 1e-30
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{ctx}: [{worst}] got {got[worst].item()!r}, want {want[worst].item()!r} (err {err[worst].item():.3g} > {bound[worst].item():.3g})"
    )


def group_sizes(n: int, head: int = 8) -> list[int]:
    """1 (single channels) and a head-like group: `head` when it divides n, else all n as one group."""
    return sorted({1, head if n % head == 0 else n})


__all__ = ["DTYPES", "RESOLUTION", "SCORE_KINDS", "assert_scores_close", "group_sizes", "make_inputs", "magnitude"]
