"""The exact parameter count of one decoder layer, as a function of what it keeps.

A layer keeping ``g`` KV groups (``r = Hq/Hkv`` query heads each) and ``f`` MLP channels holds::

    attn(g) = d*hd*(2*r*g + 2*g) + qkv_bias*hd*(r*g + 2*g) + o_bias*d + qk_norm*2*hd + group_norm*hd*(r*g + g)
    mlp(f)  = 3*d*f + mlp_bias*(2*f + d)
    layer   = attn(g) + mlp(f) + norm_params

``d`` is the hidden size and ``hd`` the head size. The o_proj and down_proj biases (``d`` each) and the
per-head q/k norms (Qwen3: ``hd`` each, shared by all heads) are never pruned but are counted; q/k norms over the
whole projections (OLMo-2: ``group_norm``) lose their heads' weights with them. This is
the formula the Rust solvers use (``rust/src/alloc/mod.rs``); the shape rows handed to them are
:meth:`LayerShape.row`.

Two per-token quantities a budget can also bound, per layer::

    kv_cache(g) = 2 * g * hd * dtype_bytes                         (K and V of one cached token)
    flops(g, f) = 2 * (g*d*hd*(2*r + 2) + 3*d*f) + 4 * r*g * hd * S  (one token of a forward over S positions)

FLOPs are 2 per multiply-add of q/k/v/o, gate/up/down, Q.K^T and A.V (all ``S`` positions, as dense
kernels compute them); norms, activations, rotary embeddings, softmax and bias additions are not
counted, as ``torch.utils.flop_counter`` counts them. Outside the layers, ``lm_head`` adds ``2*V*d``
(:func:`lm_head_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer. ``norm_params``: its layer norms (never pruned)."""

    hidden: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_params: int = 0
    group_norm: bool = False

    def params(self, kv_groups: int | None = None, mlp: int | None = None) -> int:
        """Parameters of the layer keeping ``kv_groups`` KV groups and ``mlp`` channels (default: all)."""
        g = self.num_kv_heads if kv_groups is None else kv_groups
        f = self.intermediate if mlp is None else mlp
        r = self.num_q_heads // self.num_kv_heads
        d, hd = self.hidden, self.head_dim
        attn = d * hd * (2 * r * g + 2 * g)
        attn += (hd * (r * g + 2 * g) if self.qkv_bias else 0) + (d if self.o_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        attn += hd * (r * g + g) if self.group_norm else 0
        mlp_p = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        return attn + mlp_p + self.norm_params

    def kv_cache_bytes(self, kv_groups: int | None = None, dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token of the layer keeping ``kv_groups`` KV groups: ``2 * g * hd * dtype_bytes``."""
        g = self.num_kv_heads if kv_groups is None else kv_groups
        return 2 * g * self.head_dim * dtype_bytes

    def flops(self, kv_groups: int | None = None, mlp: int | None = None, seq_len: int = 2048) -> int:
        """FLOPs per token of the layer at ``seq_len`` positions: ``2*(g*d*hd*(2r+2) + 3*d*f) + 4*r*g*hd*S``."""
        g = self.num_kv_heads if kv_groups is None else kv_groups
        f = self.intermediate if mlp is None else mlp
        r = self.num_q_heads // self.num_kv_heads
        d, hd = self.hidden, self.head_dim
        return 2 * (g * d * hd * (2 * r + 2) + 3 * d * f) + 4 * r * g * hd * seq_len

    def row(self) -> list[int]:
        """The int64 row of the Rust solvers' ``shapes`` array (column order of ``SHAPE_COLUMNS``)."""
        return [int(getattr(self, name)) for name in SHAPE_COLUMNS]


SHAPE_COLUMNS = (
    "hidden", "num_q_heads", "num_kv_heads", "head_dim", "intermediate",
    "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "norm_params", "group_norm",
)  # fmt: skip


def lm_head_flops(hidden: int, vocab: int) -> int:
    """FLOPs per token outside the decoder layers: the ``lm_head`` matmul, ``2 * vocab * hidden`` (tied or not)."""
    return 2 * vocab * hidden


def mlp_grid_size(intermediate: int, mlp_step: int) -> int:
    """Points of the budget's MLP grid: index j keeps ``min(j * mlp_step, I)`` channels, j = 0 .. ceil(I / mlp_step)."""
    return -(-intermediate // mlp_step) + 1


__all__ = ["SHAPE_COLUMNS", "LayerShape", "lm_head_flops", "mlp_grid_size"]
