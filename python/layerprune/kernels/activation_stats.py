"""Triton kernel: per-channel sum and sum of squares of a tokens × channels activation, one pass.

Each program owns BLOCK_C channels and one span of tokens and writes float32 partials to its own
slot of a `[splits, channels]` buffer; the splits are summed afterwards in a fixed order (no atomics:
the same result on every run). `layerprune.scoring.ActivationStats` adds batches in float64.
"""

from __future__ import annotations

import torch

from layerprune.kernels import HAS_TRITON, launch_device, target_programs

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _channel_sums_kernel(
        x_ptr, sum_ptr, sumsq_ptr, N, C, stride_x, span,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        n_begin = tl.program_id(1) * span
        n_end = tl.minimum(n_begin + span, N)
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for n0 in range(n_begin, n_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            mask = (rows < n_end)[:, None] & col_mask[None, :]
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            acc += x
            acc_sq += x * x
        split = tl.program_id(1)
        tl.store(sum_ptr + split * C + cols, tl.sum(acc, axis=0), mask=col_mask)
        tl.store(sumsq_ptr + split * C + cols, tl.sum(acc_sq, axis=0), mask=col_mask)


def channel_sums_triton(x: torch.Tensor, programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, sumsq) over rows of a 2-D tensor, float32, on x's device (`programs`: grid target)."""
    if not HAS_TRITON:  # pragma: no cover - guarded by the dispatcher
        raise RuntimeError("triton is not installed")
    x = x.detach()
    if x.stride(1) != 1:
        x = x.contiguous()
    n, c = x.shape
    s = torch.zeros(c, dtype=torch.float32, device=x.device)
    q = torch.zeros_like(s)
    if n == 0 or c == 0:
        return s, q
    block_n, block_c = 32, 128
    lines = triton.cdiv(c, block_c)
    if programs is not None:
        target = programs
    else:
        target = target_programs(x.device, 4)
    red_blocks = triton.cdiv(n, block_n)
    splits = max(1, min(red_blocks, target // lines))
    span = triton.cdiv(red_blocks, splits) * block_n
    splits = triton.cdiv(n, span)
    partial_s = torch.empty(splits, c, dtype=torch.float32, device=x.device)
    partial_q = torch.empty_like(partial_s)
    with launch_device(x.device):
        _channel_sums_kernel[(lines, splits)](x, partial_s, partial_q, n, c, x.stride(0), span, BLOCK_N=block_n,
                                              BLOCK_C=block_c)
    return partial_s.sum(0), partial_q.sum(0)
