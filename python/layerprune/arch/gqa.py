"""The GQA index map, defined once.

Under grouped-query attention with ``r = Hq / Hkv`` query heads per KV head, KV head ``j`` serves query
heads ``r*j .. r*j+r-1`` (transformers' ``repeat_kv`` repeats each KV head ``r`` times in place). A KV
group is that KV head with its ``r`` query heads; removing it removes the k/v rows of head ``j``, the q
rows of its query heads and the matching o_proj input columns. A head is ``head_dim`` consecutive rows
(or columns).
"""

from __future__ import annotations

from collections.abc import Sequence

from layerprune.errors import InvalidInputError


def group_ratio(num_q_heads: int, num_kv_heads: int) -> int:
    """``r = Hq / Hkv``; raises InvalidInputError when Hq is not a multiple of Hkv."""
    if num_kv_heads < 1 or num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise InvalidInputError(f"num_heads={num_q_heads} is not a positive multiple of num_kv_heads={num_kv_heads}")
    return num_q_heads // num_kv_heads


def query_heads(kv_heads: Sequence[int], ratio: int) -> list[int]:
    """Query heads served by the given KV heads: ``r*j .. r*j+r-1`` for each ``j`` in order."""
    return [ratio * int(j) + t for j in kv_heads for t in range(ratio)]


def kv_group_of_query_head(num_q_heads: int, ratio: int) -> list[int]:
    """For each query head ``h`` the KV group it belongs to, ``h // r``."""
    return [h // ratio for h in range(num_q_heads)]


def head_rows(heads: Sequence[int], head_dim: int) -> list[int]:
    """Rows (or columns) ``h*head_dim .. (h+1)*head_dim-1`` of the given heads, in order."""
    return [int(h) * head_dim + d for h in heads for d in range(head_dim)]


def kv_rows(kv_heads: Sequence[int], head_dim: int) -> list[int]:
    """k_proj / v_proj rows of the given KV heads."""
    return head_rows(kv_heads, head_dim)


def q_rows(kv_heads: Sequence[int], ratio: int, head_dim: int) -> list[int]:
    """q_proj rows (equally o_proj input columns) of the query heads served by the given KV heads."""
    return head_rows(query_heads(kv_heads, ratio), head_dim)


__all__ = ["group_ratio", "head_rows", "kv_group_of_query_head", "kv_rows", "q_rows", "query_heads"]
