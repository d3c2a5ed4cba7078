"""Per-layer cost curves without pruned evaluations: each layer's reconstruction error after the refit, in loss
units through a diagonal Fisher of the residual stream.

For layer ``l`` with output projection ``W`` (o_proj or down_proj), structured OBS (:mod:`layerprune.refit.obs`)
gives the error after the refit of every removal count in one greedy pass, ``E(k) = Σ_i f_i mean_t Δy_{t,i}²``,
weighting output row ``i`` by the Fisher diagonal of the layer's output hidden state (the residual stream),
``f_i = N · Σ_t (∂L/∂h_{t,i})²`` for the mean calibration loss ``L`` over ``N`` tokens. The second-order estimate
of the loss increase is then ``ΔL(k) ≈ ½ E(k)`` (OBD / Fisher-weighted OBS), comparable across layers and between
attention and MLP, which is what ``dp`` needs. Cost: one forward and backward pass on the refit batch (the Grams
and the Fisher together) and the OBS algebra; no pruned forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layerprune import distributed
from layerprune.arch import adapter_for, gqa
from layerprune.arch.budget import mlp_grid_size
from layerprune.errors import InvalidInputError
from layerprune.importance.result import LayerImportance
from layerprune.refit import DEFAULT_DAMPING, InputGram
from layerprune.refit.obs import DEFAULT_BATCH_FRACTION, structured_obs


def grams_and_fisher(model: torch.nn.Module, ids: torch.Tensor, *, micro_batch: int = 8,
                     progress: bool = True) -> tuple[list[dict[str, InputGram]], list[torch.Tensor], float]:
    """Per layer the o_proj / down_proj input Grams and the residual-stream Fisher diagonal ``f`` (``[d]``) after
    the layer, from one forward and backward pass over ``ids`` ``[n, T]`` in micro-batches; and the mean loss.
    The model is only read (its parameters' ``requires_grad`` is restored)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    grams = [{"o_proj": InputGram.empty(layer.self_attn.o_proj.in_features),
              "down_proj": InputGram.empty(layer.mlp.down_proj.in_features)} for layer in layers]
    hidden = adapter.embeddings(model).weight.shape[1]
    fisher = [torch.zeros(hidden, dtype=torch.float64) for _ in layers]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles: list[Any] = []

    def gram_hook(sink: InputGram):
        def hook(_module, args):
            sink.update(args[0].detach())
        return hook

    def output_hook(l: int):
        def accumulate(grad: torch.Tensor) -> None:
            fisher[l].add_(grad.detach().double().pow(2).sum((0, 1)))

        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            h.register_hook(accumulate)
        return hook

    def embed_hook(_module, _args, output):
        return output.requires_grad_(True)

    total_tokens = int(ids.shape[0] * (ids.shape[1] - 1))
    loss_sum = 0.0
    device = next(model.parameters()).device
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for l, (layer, sink) in enumerate(zip(layers, grams)):
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(gram_hook(sink["o_proj"])))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(gram_hook(sink["down_proj"])))
            handles.append(layer.register_forward_hook(output_hook(l)))
        handles.append(adapter.embeddings(model).register_forward_hook(embed_hook))
        with torch.enable_grad():
            for start in tqdm(range(0, ids.shape[0], micro_batch), desc="Grams and Fisher", disable=not progress,
                              leave=False):
                batch = ids[start:start + micro_batch].to(device)
                tokens = int(batch.shape[0] * (batch.shape[1] - 1))
                out = model(input_ids=batch, labels=batch, use_cache=False)
                # g_t = ∂(Σ_t' ℓ_t')/∂h_t (a position's gradient involves its own sequence only); f = Σ_t g_t² / N
                (out.loss * tokens).backward()
                loss_sum += float(out.loss.detach()) * tokens
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    InputGram.all_reduce([stats for layer_grams in grams for stats in layer_grams.values()])
    totals = torch.tensor([float(total_tokens), loss_sum], dtype=torch.float64)
    distributed.all_reduce_sum_(fisher + [totals])  # nothing in one process
    n = max(float(totals[0]), 1.0)
    return grams, [f / n for f in fisher], float(totals[1]) / n


def _curve_from_trace(trace: Sequence[tuple[int, float]], units: int, kept_grid: np.ndarray) -> np.ndarray:
    """``½ E`` at each kept count of ``kept_grid`` by linear interpolation of the OBS trace (removed -> error)."""
    removed = np.array([0] + [r for r, _ in trace], dtype=np.float64)
    errors = np.array([0.0] + [e for _, e in trace], dtype=np.float64)
    curve = 0.5 * np.interp(units - kept_grid.astype(np.float64), removed, errors)
    return np.maximum.accumulate(curve[::-1])[::-1]  # keeping more never costs more


def reconstruction_importance(
    model: torch.nn.Module,
    refit_ids: torch.Tensor,
    *,
    mlp_step: int = 1,
    min_kv_groups: int = 1,
    damping: float = DEFAULT_DAMPING,
    batch_fraction: float = DEFAULT_BATCH_FRACTION,
    progress: bool = True,
    grams_fisher: tuple[list[dict[str, InputGram]], list[torch.Tensor], float] | None = None,
) -> LayerImportance:
    """Cost curves ``ΔL_l(g)``, ``ΔL_l(c)`` from the Fisher-weighted OBS error after the refit (module docstring),
    on the allocation grid (attention g = 0..Hkv, MLP kept = 0, mlp_step, ..., I). ``attn``/``mlp`` summarise the
    curves at their middle point."""
    if mlp_step < 1:
        raise InvalidInputError(f"mlp_step: must be >= 1, got {mlp_step}")
    start = time.perf_counter()
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    grams, fisher, base_loss = grams_fisher or grams_and_fisher(model, refit_ids, progress=progress)
    attn_curves: list[np.ndarray] = []
    mlp_curves: list[np.ndarray] = []
    for l in tqdm(range(len(layers)), desc="reconstruction curves", disable=not progress, leave=False):
        layer = layers[l]
        geometry = adapter.geometry(model, layer)
        heads = [gqa.q_rows([j], geometry.ratio, geometry.head_dim) for j in range(geometry.num_kv_heads)]
        trace: list[tuple[int, float]] = []
        deepest = geometry.num_kv_heads - (0 if min_kv_groups == 0 else 1)
        structured_obs(layer.self_attn.o_proj.weight, grams[l]["o_proj"], heads, [deepest], damping=damping,
                       row_weights=fisher[l], trace=trace)
        attn = _curve_from_trace(trace, geometry.num_kv_heads, np.arange(geometry.num_kv_heads + 1))
        if min_kv_groups >= 1 and geometry.num_kv_heads >= 1:
            attn[0] = attn[1]  # never planned (at least one KV group kept)
        trace = []
        structured_obs(layer.mlp.down_proj.weight, grams[l]["down_proj"], [[c] for c in range(geometry.intermediate)],
                       [geometry.intermediate], damping=damping, batch_fraction=batch_fraction,
                       row_weights=fisher[l], trace=trace)
        grid = np.minimum(np.arange(mlp_grid_size(geometry.intermediate, mlp_step)) * mlp_step, geometry.intermediate)
        attn_curves.append(attn)
        mlp_curves.append(_curve_from_trace(trace, geometry.intermediate, grid))
    attn_mid = np.array([float(c[c.size // 2]) for c in attn_curves])
    mlp_mid = np.array([float(c[c.size // 2]) for c in mlp_curves])
    return LayerImportance(
        method="reconstruction", attn=attn_mid, mlp=mlp_mid, combined=attn_mid + mlp_mid, attn_curves=attn_curves,
        mlp_curves=mlp_curves, mlp_step=mlp_step, metric="loss", base_loss=base_loss,
        seconds=time.perf_counter() - start,
        details={"calib_tokens": distributed.global_count(int(refit_ids.numel())), "damping": damping,
                 "batch_fraction": batch_fraction,
                 "estimate": "half the Fisher-weighted structured-OBS error after the refit (no pruned evaluations)"},
    )


__all__ = ["grams_and_fisher", "reconstruction_importance"]
