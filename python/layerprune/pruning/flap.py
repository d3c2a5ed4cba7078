"""FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning"), reimplemented from the paper and
checked point by point against the authors' released code (its AL-AM structure, the paper's default).

1. **Fluctuation metric.** An input column ``j`` of an output projection scores ``s_j = Var(X_j) · ‖W[:, j]‖²``
   (the weighted input feature variance, WIFV): how much the output moves when that input is replaced by its
   mean. The released code squares it for o_proj's columns (``s_j²``), and so does this one.
2. **Standardisation**, per layer and per module: ``z = (s − mean) / std`` over that layer's o_proj input columns
   (every query head's ``head_dim`` of them) and over its MLP channels. A KV group then scores the mean ``z`` of
   its ``r · head_dim`` columns. Standardising per column, not per group, matters: a layer has few KV groups (3 in
   SmolLM2), and three standardised group sums are always about −1.22, 0 and 1.22, whatever the layer.
3. **Global threshold.** All KV groups and channels of all layers are sorted by score; the lowest are removed,
   each counted by its parameter share (the code hard-codes LLaMA-7B's 512/3 channels per head), until the
   parameter budget is met (every layer keeps at least ``min_kv_groups`` groups and ``min_mlp_channels``
   channels: FLAP has no floor; layerprune keeps one of each unless told 0). The per-layer widths follow.
4. **Bias compensation** of the removed columns' mean contribution (:mod:`layerprune.pruning.refit_loop`,
   ``bias``), from the dense model's inputs (no error correction), as the code does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from layerprune.allocation import AllocationResult, AllocationSpec, LayerAllocation
from layerprune.arch import adapter_for, gqa
from layerprune.errors import InfeasibleError
from layerprune.refit.grams import observe_output_projection_inputs
from layerprune.scoring import ActivationStats, weight_scores


@dataclass
class FlapPlan:
    """FLAP's scores (per layer: KV groups, channels), the widths its threshold leaves, and the allocation."""

    kv_scores: list[torch.Tensor]
    channel_scores: list[torch.Tensor]
    allocation: AllocationResult


def fluctuation_scores(model: torch.nn.Module, ids: torch.Tensor, *, micro_batch: int = 8,
                       progress: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer the standardised fluctuation of every KV group (o_proj columns of its query heads) and MLP channel
    (:func:`layer_fluctuation`)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    stats = [(ActivationStats(), ActivationStats()) for _ in layers]
    observe_output_projection_inputs(model, ids, [{"o_proj": o, "down_proj": d} for o, d in stats],
                                     micro_batch=micro_batch, desc="fluctuation", progress=progress)
    ActivationStats.all_reduce([s for pair in stats for s in pair])  # data-parallel: every rank's samples
    scores = [layer_fluctuation(adapter.geometry(model, layer), layer, o, d) for layer, (o, d) in zip(layers, stats)]
    return [kv for kv, _ in scores], [ch for _, ch in scores]


def layer_fluctuation(geometry: Any, layer: torch.nn.Module, o_stats: ActivationStats,
                      d_stats: ActivationStats) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's standardised (KV-group, channel) scores from its o_proj and down_proj input statistics: per
    column ``s_j = Var(X_j) · ‖W[:, j]‖²``; o_proj's ``s_j²`` standardised over the layer's columns and averaged
    over each KV group's query-head columns; the channels' ``s_j`` standardised over the layer's channels."""
    o_proj, down = layer.self_attn.o_proj.weight.detach(), layer.mlp.down_proj.weight.detach()
    per_column = (weight_scores(o_proj, kind="l2", axis=1) * o_stats.var.to(o_proj.device)).double().cpu() ** 2
    per_head = standardise(per_column).view(geometry.num_q_heads, geometry.head_dim).mean(1)
    group_of = torch.tensor(gqa.kv_group_of_query_head(geometry.num_q_heads, geometry.ratio))
    kv = torch.zeros(geometry.num_kv_heads, dtype=torch.float64).index_add_(0, group_of, per_head) / geometry.ratio
    channels = standardise((weight_scores(down, kind="l2", axis=1) * d_stats.var.to(down.device)).double().cpu())
    return kv, channels


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """``(s − mean) / std`` (population std; 1 when the scores are all equal)."""
    s = scores.double()
    std = float(s.std(unbiased=False)) if s.numel() > 1 else 0.0
    return (s - s.mean()) / (std if std > 0 else 1.0)


def flap_allocation(spec: AllocationSpec, kv_scores: list[torch.Tensor], channel_scores: list[torch.Tensor],
                    min_kv_groups: int = 1) -> AllocationResult:
    """The widths FLAP's global threshold leaves under ``spec``'s budget (``T = ⌊ratio · total + ½⌋`` removed), from
    per-layer standardised scores (:func:`layer_fluctuation`): the lowest go first."""
    start = time.perf_counter()
    total = spec.params_total
    target = math.floor(spec.ratio * total + 0.5)
    candidates: list[tuple[float, int, str]] = []  # (z, layer, "kv" | "mlp")
    for l, (kv, ch) in enumerate(zip(kv_scores, channel_scores)):
        candidates += [(float(z), l, "kv") for z in kv]
        candidates += [(float(z), l, "mlp") for z in ch]
    candidates.sort(key=lambda c: c[0])
    kept_kv = [s.num_kv_heads for s in spec.layers]
    kept_mlp = [s.intermediate for s in spec.layers]
    min_mlp = 1 if spec.min_mlp is None else int(spec.min_mlp)
    removed = 0
    for _z, l, kind in candidates:  # within a layer and kind the z order is the score order
        if removed >= target:
            break
        shape = spec.layers[l]
        if kind == "kv" and kept_kv[l] > min_kv_groups:
            removed += shape.params(kept_kv[l], kept_mlp[l]) - shape.params(kept_kv[l] - 1, kept_mlp[l])
            kept_kv[l] -= 1
        elif kind == "mlp" and kept_mlp[l] > min_mlp:
            removed += shape.params(kept_kv[l], kept_mlp[l]) - shape.params(kept_kv[l], kept_mlp[l] - 1)
            kept_mlp[l] -= 1
    if removed < target:
        raise InfeasibleError(f"flap: removing every prunable group and channel reaches {removed:,} of the "
                              f"{target:,} parameters asked for (min_kv_groups, min_mlp_channels)")
    layers = [LayerAllocation(g, g * (s.num_q_heads // s.num_kv_heads), f, 1.0 - g / s.num_kv_heads,
                              1.0 - f / s.intermediate, s.params(g, f))
              for s, g, f in zip(spec.layers, kept_kv, kept_mlp)]
    after = spec.extra_params + sum(la.params_kept for la in layers)
    steps = [s.params() - s.params(s.num_kv_heads - 1) for s in spec.layers] + [3 * s.hidden for s in spec.layers]
    kv_before = spec.kv_cache_bytes_total
    kv_after = sum(s.kv_cache_bytes(g, dtype_bytes=spec.kv_cache_dtype_bytes) for s, g in zip(spec.layers, kept_kv))
    flops_before = spec.flops_total
    flops_after = spec.extra_flops + sum(s.flops(g, f, seq_len=spec.flops_seq_len)
                                         for s, g, f in zip(spec.layers, kept_kv, kept_mlp))
    return AllocationResult(
        kv_cache_bytes_before=kv_before, kv_cache_bytes_after=kv_after,
        actual_kv_cache_ratio=1.0 - kv_after / kv_before if kv_before else 0.0,
        flops_before=flops_before, flops_after=flops_after,
        actual_flops_ratio=1.0 - flops_after / flops_before if flops_before else 0.0, flops_seq_len=spec.flops_seq_len,
        layers=layers, params_before=total, params_after=after, actual_ratio=1.0 - after / total,
        actual_ratio_layers=1.0 - (after - spec.extra_params) / spec.params_layers, objective=float("nan"),
        solver="flap", solve_seconds=time.perf_counter() - start, binding=[], target_removed=target,
        granule=max(steps), notes=["FLAP global threshold on standardised fluctuation scores; lands in "
                                   "[target, target + the largest single step]"],
    )


def flap_plan(model: torch.nn.Module, ids: torch.Tensor, spec: AllocationSpec, *, min_kv_groups: int = 1,
              progress: bool = True) -> FlapPlan:
    """Scores on ``ids`` (the calibration text), then the widths of FLAP's threshold under ``spec``."""
    kv, ch = fluctuation_scores(model, ids, progress=progress)
    return FlapPlan(kv, ch, flap_allocation(spec, kv, ch, min_kv_groups))


__all__ = ["FlapPlan", "flap_allocation", "flap_plan", "fluctuation_scores", "layer_fluctuation", "standardise"]
