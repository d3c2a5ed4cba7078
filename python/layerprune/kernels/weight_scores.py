"""Triton kernel: fused elementwise importance score + row/column reduction + group sum.

One pass over W (and G, H when the kind reads them), float32 accumulation. Each program owns a
block of output lines (rows for axis=0, columns for axis=1) and one span of the reduced
dimension, and writes its partial line sums to its own slot of a `[splits, lines]` buffer, so
the grid can split long reductions across SMs. The splits and then the groups of `group_size`
lines are summed afterwards in a fixed order: no atomics, so the result is the same on every run
(`--seed` promises the same kept heads twice). For `vectorize` the absolute value is taken after
the full group sum (one tiny elementwise op on the output).
Formulas: see `layerprune.scoring.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerprune.kernels import HAS_TRITON, launch_device, target_programs

KIND_IDS = {"taylor": 0, "vectorize": 1, "taylor2": 2, "taylor-mix": 3, "l1": 4, "l2": 5}
_USES_G = {"taylor", "vectorize", "taylor-mix"}
_USES_H = {"taylor2", "taylor-mix"}

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _element_score(w, g, h, KIND: tl.constexpr):
        if KIND == 0:
            e = tl.abs(w * g)
        elif KIND == 1:
            e = w * g
        elif KIND == 2:
            e = tl.abs(w * h * w)
        elif KIND == 3:
            e = tl.abs(w * g - 0.5 * (w * h * w))
        elif KIND == 4:
            e = tl.abs(w)
        else:
            e = w * w
        return e

    @triton.jit
    def _load_tile(w_ptr, g_ptr, h_ptr, rows, cols, mask, stride_w, stride_g, stride_h, KIND: tl.constexpr,
                   USES_G: tl.constexpr, USES_H: tl.constexpr):
        r64 = rows.to(tl.int64)[:, None]
        c = cols[None, :]
        w = tl.load(w_ptr + r64 * stride_w + c, mask=mask, other=0.0).to(tl.float32)
        if USES_G:
            g = tl.load(g_ptr + r64 * stride_g + c, mask=mask, other=0.0).to(tl.float32)
        else:
            g = w
        if USES_H:
            h = tl.load(h_ptr + r64 * stride_h + c, mask=mask, other=0.0).to(tl.float32)
        else:
            h = w
        return _element_score(w, g, h, KIND)

    @triton.jit
    def _weight_scores_kernel(
        w_ptr, g_ptr, h_ptr, partial_ptr,
        R, C, stride_w, stride_g, stride_h, span,
        KIND: tl.constexpr, USES_G: tl.constexpr, USES_H: tl.constexpr, AXIS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid_line = tl.program_id(0)
        pid_split = tl.program_id(1)
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        if AXIS == 0:
            rows = pid_line * BLOCK_R + tl.arange(0, BLOCK_R)
            row_mask = rows < R
            c_begin = pid_split * span
            c_end = tl.minimum(c_begin + span, C)
            for c0 in range(c_begin, c_end, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                mask = row_mask[:, None] & (cols < c_end)[None, :]
                acc += _load_tile(w_ptr, g_ptr, h_ptr, rows, cols, mask, stride_w, stride_g, stride_h,
                                  KIND, USES_G, USES_H)
            part = tl.sum(acc, axis=1)
            tl.store(partial_ptr + pid_split * R + rows, part, mask=row_mask)
        else:
            cols = pid_line * BLOCK_C + tl.arange(0, BLOCK_C)
            col_mask = cols < C
            r_begin = pid_split * span
            r_end = tl.minimum(r_begin + span, R)
            for r0 in range(r_begin, r_end, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                mask = (rows < r_end)[:, None] & col_mask[None, :]
                acc += _load_tile(w_ptr, g_ptr, h_ptr, rows, cols, mask, stride_w, stride_g, stride_h,
                                  KIND, USES_G, USES_H)
            part = tl.sum(acc, axis=0)
            tl.store(partial_ptr + pid_split * C + cols, part, mask=col_mask)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile (`block_r` rows × `block_c` columns, powers of two), warps per program, and the grid
    target in programs per SM (long reductions are split until the grid reaches it)."""

    block_r: int
    block_c: int
    num_warps: int = 4
    programs_per_sm: int = 4

    def __post_init__(self) -> None:
        for name in ("block_r", "block_c", "num_warps"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"LaunchConfig.{name} must be a power of two, got {v}")
        if self.programs_per_sm <= 0:
            raise ValueError(f"LaunchConfig.programs_per_sm must be positive, got {self.programs_per_sm}")


# Untuned starting points; benches/tune_triton.py sweeps TUNING_CANDIDATES on a GPU.
DEFAULT_CONFIGS = {0: LaunchConfig(16, 256), 1: LaunchConfig(32, 128)}
# Tiles of 4-16 Ki elements; rows want wide column spans, columns tall row spans.
TUNING_CANDIDATES = {
    0: [LaunchConfig(r, c, w) for r, c, w in ((16, 256, 4), (8, 512, 4), (4, 1024, 4), (2, 2048, 8), (8, 1024, 8), (32, 256, 8))],
    1: [LaunchConfig(r, c, w) for r, c, w in ((32, 128, 4), (64, 64, 4), (16, 256, 4), (64, 128, 8), (128, 64, 8), (32, 256, 8))],
}


def _row_major(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t if t.stride(1) == 1 else t.contiguous()


def weight_scores_triton(
    weight: torch.Tensor,
    grad: torch.Tensor | None,
    fisher: torch.Tensor | None,
    *,
    kind: str,
    axis: int,
    group_size: int,
    programs: int | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Launch the fused kernel. Inputs are validated by `layerprune.scoring.weight_scores`.

    `config` overrides the tile and warps (default `DEFAULT_CONFIGS[axis]`); `programs` overrides
    the target grid size (default `config.programs_per_sm` × SMs on CUDA, 1 in the interpreter);
    tests use it to exercise split reductions on CPU."""
    if not HAS_TRITON:  # pragma: no cover - guarded by the dispatcher
        raise RuntimeError("triton is not installed")
    w, g, h = _row_major(weight.detach()), _row_major(None if grad is None else grad.detach()), _row_major(
        None if fisher is None else fisher.detach()
    )
    rows, cols = w.shape
    n_out = rows if axis == 0 else cols
    out = torch.zeros(n_out // group_size, dtype=torch.float32, device=w.device)
    if rows == 0 or cols == 0:
        return out
    uses_g, uses_h = kind in _USES_G, kind in _USES_H
    g_arg = g if uses_g else w
    h_arg = h if uses_h else w
    cfg = config or DEFAULT_CONFIGS[axis]
    block_r, block_c = cfg.block_r, cfg.block_c
    if axis == 0:
        lines, reduced, block_red = triton.cdiv(rows, block_r), cols, block_c
    else:
        lines, reduced, block_red = triton.cdiv(cols, block_c), rows, block_r
    red_blocks = triton.cdiv(reduced, block_red)
    target = programs if programs is not None else target_programs(w.device, cfg.programs_per_sm)
    splits = max(1, min(red_blocks, target // lines))
    span = triton.cdiv(red_blocks, splits) * block_red
    splits = triton.cdiv(reduced, span)
    partial = torch.empty(splits, n_out, dtype=torch.float32, device=w.device)
    with launch_device(w.device):
        _weight_scores_kernel[(lines, splits)](
            w, g_arg, h_arg, partial,
            rows, cols, w.stride(0), g_arg.stride(0), h_arg.stride(0), span,
            KIND=KIND_IDS[kind], USES_G=uses_g, USES_H=uses_h, AXIS=axis,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=cfg.num_warps,
        )
    out = partial.sum(0).view(-1, group_size).sum(1)
    if kind == "vectorize":
        out.abs_()
    return out
