"""Which KV groups and MLP channels a layer keeps, from their scores: the top ones, ties to the lower index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from layerprune.errors import InvalidInputError


@dataclass(frozen=True)
class LayerKeep:
    """Indices KEPT in one decoder layer (sorted, unique): KV heads and MLP channels."""

    kv_heads: tuple[int, ...]
    mlp_channels: tuple[int, ...]


def _scores_1d(scores: Any, field: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"{field}: not a numeric vector ({err})") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidInputError(f"{field}: expected a non-empty 1-D vector, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{field}: contains NaN or infinite scores")
    return arr


def _top_k_sorted(scores: np.ndarray, k: int) -> tuple[int, ...]:
    """Indices of the k largest scores (ties: lower index wins), returned in increasing index order."""
    order = np.argsort(-scores, kind="stable")  # stable sort keeps lower indices first among equal scores
    return tuple(sorted(int(i) for i in order[:k]))


def select_keep(
    kv_group_scores: Sequence[Any],
    channel_scores: Sequence[Any],
    kv_groups_kept: Sequence[int],
    mlp_kept: Sequence[int],
) -> list[LayerKeep]:
    """Per layer, keep the kv_groups_kept[l] highest-scoring KV groups and the mlp_kept[l] highest-scoring channels.

    Ties are broken by the lower index, so the result is deterministic. Counts must be in 0..n (0: an empty block).
    """
    n_layers = len(kv_group_scores)
    for name, seq in (("channel_scores", channel_scores), ("kv_groups_kept", kv_groups_kept), ("mlp_kept", mlp_kept)):
        if len(seq) != n_layers:
            raise InvalidInputError(f"{name}: has {len(seq)} layers, kv_group_scores has {n_layers}")
    keep = []
    for layer in range(n_layers):
        kv = _scores_1d(kv_group_scores[layer], f"kv_group_scores[{layer}]")
        ch = _scores_1d(channel_scores[layer], f"channel_scores[{layer}]")
        n_kv, n_ch = _count(kv_groups_kept[layer], f"kv_groups_kept[{layer}]"), _count(mlp_kept[layer], f"mlp_kept[{layer}]")
        if not 0 <= n_kv <= kv.size:
            raise InvalidInputError(f"kv_groups_kept[{layer}]={n_kv}: must be in 0..{kv.size}")
        if not 0 <= n_ch <= ch.size:
            raise InvalidInputError(f"mlp_kept[{layer}]={n_ch}: must be in 0..{ch.size}")
        keep.append(LayerKeep(kv_heads=_top_k_sorted(kv, n_kv), mlp_channels=_top_k_sorted(ch, n_ch)))
    return keep


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            return int(value.item())
        raise InvalidInputError(f"{field}: expected an integer count, got {value!r}")
    return int(value)


__all__ = ["LayerKeep", "select_keep"]
