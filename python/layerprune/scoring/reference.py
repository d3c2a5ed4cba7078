"""Plain torch reference for every score (the correctness oracle and the fallback backend).

All arithmetic in float32, whatever the storage dtype. For a weight W (rows × cols), gradient G
and Fisher diagonal H (accumulated squared gradients) the elementwise scores are

    taylor      |W·G|              LLM-Pruner `param_first`; Torch-Pruning GroupTaylorImportance
    vectorize   W·G  (|.| of the group sum)   LLM-Pruner `vectorize`; TP `multivariable=True`
    taylor2     |W·H·W|            LLM-Pruner `param_second`
    taylor-mix  |W·G − ½·W·H·W|    LLM-Pruner `param_mix` (abs of the mixed element, then summed)
    l1          |W|                TP GroupMagnitudeImportance(p=1)
    l2          W²                 TP GroupMagnitudeImportance(p=2)

reduced over each row (axis=0: one value per output row) or column (axis=1: one value per
input column), then summed over groups of `group_size` consecutive rows / columns.
"""

from __future__ import annotations

import torch

from layerprune.errors import InvalidInputError

SCORE_KINDS: tuple[str, ...] = ("taylor", "vectorize", "taylor2", "taylor-mix", "l1", "l2")
NEEDS_GRAD = frozenset({"taylor", "vectorize", "taylor-mix"})
NEEDS_FISHER = frozenset({"taylor2", "taylor-mix"})


def elementwise_scores(weight: torch.Tensor, grad: torch.Tensor | None, fisher: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The per-element score of `kind` in float32 (signed for `vectorize`)."""
    w = weight.float()
    if kind == "taylor":
        return (w * grad.float()).abs()
    if kind == "vectorize":
        return w * grad.float()
    if kind == "taylor2":
        return (w * fisher.float() * w).abs()
    if kind == "taylor-mix":
        return (w * grad.float() - 0.5 * (w * fisher.float() * w)).abs()
    if kind == "l1":
        return w.abs()
    if kind == "l2":
        return w * w
    raise InvalidInputError(f"kind: unknown score kind {kind!r}; expected one of {', '.join(SCORE_KINDS)}")


def weight_scores_reference(
    weight: torch.Tensor,
    grad: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    *,
    kind: str = "taylor",
    axis: int = 0,
    group_size: int = 1,
) -> torch.Tensor:
    """Reference `weight_scores`: float32 tensor of length (rows or cols) / group_size."""
    e = elementwise_scores(weight, grad, fisher, kind)
    per_line = e.sum(dim=1 if axis == 0 else 0)
    grouped = per_line.view(-1, group_size).sum(dim=1)
    return grouped.abs() if kind == "vectorize" else grouped


def channel_sums_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float32 sum and sum of squares of a tokens × channels tensor."""
    xf = x.reshape(-1, x.shape[-1]).float()
    return xf.sum(dim=0), (xf * xf).sum(dim=0)
