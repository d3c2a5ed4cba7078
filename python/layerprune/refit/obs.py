"""Structured Optimal Brain Surgeon: remove whole column groups of an output projection in the order that least
increases its reconstruction error, updating the remaining weights after every removal (SlimGPT's batched greedy
pruning; Kurtic et al.'s group OBS).

For ``y = W x`` with calibration second moment ``H = XᵀX / n`` and ``Ĥ = H + λI`` (``λ = damping · mean diag H``,
SparseGPT's damping on the whole matrix), removing the column set ``Q`` from the current weights and refitting
the others minimises ``tr((W − W') Ĥ (W − W')ᵀ)`` subject to ``W'[:, Q] = 0``. With ``G = Ĥ⁻¹`` restricted to
the surviving columns:

    ΔE(Q) = tr(W_Q (G_QQ)⁻¹ W_Qᵀ)        W ← W − W_Q (G_QQ)⁻¹ G_Q:        G ← G − G_:Q (G_QQ)⁻¹ G_Q:

A group is a KV group's ``r·head_dim`` o_proj columns (its query heads) or one MLP channel of down_proj. Groups are
removed greedily: one per step when they are few (attention), a batch of the lowest-scoring ones per step for
channels (SlimGPT's dynamic group size: a fixed fraction of what is still to be removed, so late steps are exact
single removals). ``row_weights`` ``w_i`` weigh each output row's error (``Σ_i w_i ‖Δy_i‖²``, e.g. a diagonal
Fisher of the residual stream, which makes errors of different layers comparable); the updates do not depend on
them since every row is refit independently with the same ``G``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from layerprune.errors import InvalidInputError, NumericalError
from layerprune.refit.lstsq import DEFAULT_DAMPING, InputGram, damped_cholesky

# Channels removed per step: this fraction of those still to be removed (at least one).
DEFAULT_BATCH_FRACTION = 1.0 / 16.0
NORM_ROWS = 256  # weight rows squared at a time in the channels' errors


@dataclass(frozen=True)
class ObsStage:
    """The projection after ``len(removed)`` groups were removed: which, in order, the refit weights (float64,
    removed columns zero) and the error ``Σ_i w_i ‖Δy_i‖²`` per calibration row (damped objective)."""

    removed: tuple[int, ...]
    weight: torch.Tensor
    error: float


def damped_inverse(stats: InputGram, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``(H/n + λI)⁻¹`` with ``λ = damping · mean diag(H/n)``; the damping grows tenfold until it factors. One new
    matrix: the factor is made in it and inverted in place (LAPACK's potri on its column-major view)."""
    if stats.count < 1:
        raise InvalidInputError("obs: no calibration rows were collected")
    factor = damped_cholesky(stats.gram, damping, "obs", divisor=stats.count)
    view = factor.T  # the upper factor U = Lᵀ, column-major: (UᵀU)⁻¹ is written over it, both triangles
    torch.cholesky_inverse(view, upper=True, out=view)
    return factor


def _group_errors(w: torch.Tensor, blocks: torch.Tensor, cols: torch.Tensor,
                  row_weights: torch.Tensor | None) -> torch.Tensor:
    """``ΔE`` of removing each group alone: ``cols`` ``[k, size]`` its columns, ``blocks`` ``[k, size, size]`` its
    diagonal blocks of the current inverse (``[k]`` diagonal entries when ``size == 1``)."""
    if cols.shape[1] == 1:  # every column's weighted norm at once: cheaper than gathering the live ones first
        norms = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device)
        for r in range(0, w.shape[0], NORM_ROWS):  # rows in blocks: no [out, in] square beside w
            square = w[r:r + NORM_ROWS].square()
            norms += square.sum(0) if row_weights is None else row_weights[r:r + NORM_ROWS] @ square
        return norms[cols[:, 0]] / blocks
    wq = w.index_select(1, cols.reshape(-1)).reshape(w.shape[0], *cols.shape)  # [out, k, size]
    if row_weights is not None:
        wq = wq * row_weights.sqrt()[:, None, None]
    factor = torch.linalg.cholesky(blocks)
    solved = torch.linalg.solve_triangular(factor, wq.permute(1, 2, 0), upper=False)
    return (solved ** 2).sum((1, 2))


def structured_obs(
    weight: torch.Tensor,
    stats: InputGram,
    groups: Sequence[Sequence[int]],
    removal_counts: Sequence[int],
    *,
    damping: float = DEFAULT_DAMPING,
    batch_fraction: float | None = None,
    row_weights: torch.Tensor | None = None,
    trace: list[tuple[int, float]] | None = None,
) -> list[ObsStage]:
    """Greedy structured OBS on ``weight`` ``[out, in]`` (the dense projection) and its input ``stats``.

    ``groups``: disjoint lists of equal length of input columns, one per removable unit. ``removal_counts``: the
    numbers of groups removed at which a stage is returned (the removal order is nested: stage ``k`` extends
    stage ``k-1``). ``batch_fraction``: groups removed per step as a fraction of what remains to the next stage
    (``None``: one per step, exact greedy). Returns one :class:`ObsStage` per count, in increasing order;
    ``trace`` (a list) receives ``(groups removed, error)`` after every step, the error curve of the order.

    The inverse is never rewritten: after removals it is ``G₀ − ZᵀZ`` with ``Z`` the stacked ``L⁻¹ G_Q:`` of
    every step (``L`` the Cholesky factor of ``G_QQ``), so a step costs ``O(|Q| · removed · in)``, not ``O(in²)``.
    """
    if weight.dim() != 2 or stats.gram.shape != (weight.shape[1], weight.shape[1]):
        raise InvalidInputError(f"obs: weight {tuple(weight.shape)} does not match the Gram {tuple(stats.gram.shape)}")
    if not groups or len({len(g) for g in groups}) != 1 or len(groups[0]) == 0:
        raise InvalidInputError("obs: groups must be non-empty lists of the same length")
    device = stats.gram.device
    index = torch.as_tensor([list(g) for g in groups], dtype=torch.long, device=device)
    if int(index.min()) < 0 or int(index.max()) >= weight.shape[1] or index.unique().numel() != index.numel():
        raise InvalidInputError(f"obs: group columns must be distinct and in 0..{weight.shape[1] - 1}")
    counts = sorted(set(int(c) for c in removal_counts))
    if counts and (counts[0] < 0 or counts[-1] > len(groups)):
        raise InvalidInputError(f"obs: removal counts must be in 0..{len(groups)}, got {list(removal_counts)}")
    if batch_fraction is not None and not 0.0 < batch_fraction <= 1.0:
        raise InvalidInputError(f"obs: batch_fraction must be in (0, 1], got {batch_fraction!r}")
    rw = None if row_weights is None else row_weights.detach().to(device, torch.float64)
    if rw is not None and (rw.shape != (weight.shape[0],) or bool((rw < 0).any())):
        raise InvalidInputError(f"obs: row_weights must be {weight.shape[0]} non-negative numbers")

    w = weight.detach().to(device, torch.float64, copy=True)
    g0 = damped_inverse(stats, damping)
    size = index.shape[1]
    most = counts[-1] * size if counts else 0
    z_rows = torch.empty(most, g0.shape[0], dtype=torch.float64, device=device)  # G = G₀ − ZᵀZ, Z = z_rows[:r]
    r = 0
    if size == 1:
        diag = torch.diagonal(g0).clone()  # the current G's diagonal, kept up to date
    alive = torch.ones(len(groups), dtype=torch.bool, device=device)
    removed: list[int] = []
    error = 0.0
    stages: list[ObsStage] = []
    for target in counts:
        while len(removed) < target:
            todo = target - len(removed)
            step = 1 if batch_fraction is None else max(1, min(todo, math.ceil(todo * batch_fraction)))
            live = torch.nonzero(alive).flatten()
            cols = index[live]
            z = z_rows[:r]
            if size == 1:
                blocks = diag[cols[:, 0]]
            else:
                zc = z[:, cols]  # [r, k, size]
                blocks = g0[cols[:, :, None], cols[:, None, :]] - torch.einsum("rka,rkb->kab", zc, zc)
            scores = _group_errors(w, blocks, cols, rw)
            chosen = live[torch.argsort(scores, stable=True)[:step]]
            q = index[chosen].reshape(-1)
            rows = torch.addmm(g0[q, :], z[:, q].T, z, alpha=-1.0)  # G_Q: of the current inverse
            factor, info = torch.linalg.cholesky_ex(rows[:, q])
            if int(info) != 0:
                raise NumericalError("obs: the inverse Gram lost positive definiteness (raise the damping)")
            c = torch.linalg.solve_triangular(factor, rows, upper=False)  # L⁻¹ G_Q:
            wq = torch.linalg.solve_triangular(factor, w[:, q].T, upper=False).T  # W_Q L⁻ᵀ
            step_rows = (wq ** 2).sum(1)
            error += float(step_rows @ rw) if rw is not None else float(step_rows.sum())
            w.addmm_(wq, c, alpha=-1.0)
            w[:, q] = 0.0
            z_rows[r:r + c.shape[0]] = c
            r += c.shape[0]
            if size == 1:
                diag -= (c ** 2).sum(0)
            alive[chosen] = False
            removed.extend(int(i) for i in chosen.tolist())
            if trace is not None:
                trace.append((len(removed), error))
        dead = index[~alive].reshape(-1)
        w[:, dead] = 0.0
        last = target == counts[-1]  # the last stage takes w itself: no copy of it is left behind
        stages.append(ObsStage(removed=tuple(removed), weight=w if last else w.clone(), error=error))
    return stages


__all__ = ["DEFAULT_BATCH_FRACTION", "ObsStage", "damped_inverse", "structured_obs"]
