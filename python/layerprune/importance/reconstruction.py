"""Per-layer cost curves without pruned evaluations: each layer's reconstruction error after the refit, in loss
units through a diagonal Fisher of the residual stream.

For layer ``l`` with output projection ``W`` (o_proj or down_proj), structured OBS (:mod:`layerprune.refit.obs`)
gives the error after the refit of every removal count in one greedy pass, ``E(k) = Σ_i f_i mean_t Δy_{t,i}²``,
weighting output row ``i`` by the Fisher diagonal of the residual stream the projection's output is added to,
``f_i = N · Σ_t (∂L/∂h_{t,i})²`` for the mean calibration loss ``L`` over ``N`` tokens. The second-order estimate
of the loss increase is then ``ΔL(k) ≈ ½ E(k)`` (OBD / Fisher-weighted OBS), comparable across layers and between
attention and MLP, which is what ``dp`` needs. The attention curve weighs o_proj's rows by the Fisher of the
mid-layer residual (where o_proj's output joins it), the MLP curve down_proj's by that of the layer's output.
Cost: one forward pass over the refit batch for the Grams, a backward pass on its first ``fisher_samples``
sequences for the Fisher, and the OBS algebra; no pruned forward passes.
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
from layerprune.refit.grams import empty_grams, output_projection_hooks
from layerprune.refit.obs import DEFAULT_BATCH_FRACTION, structured_obs
from layerprune.faults import fault_point


PROJECTIONS = ("o_proj", "down_proj")


def _fisher_windows(fisher_samples: int | None, n_local: int) -> int:
    """This rank's windows among the first ``fisher_samples`` of the batch (``None``: all), at least one per rank."""
    if fisher_samples is None:
        return n_local
    if fisher_samples < 1:
        raise InvalidInputError(f"fisher_samples: must be >= 1, got {fisher_samples!r}")
    dp = distributed.active()
    return distributed.local_prefix(max(int(fisher_samples), 1 if dp is None else dp.world_size), n_local)


def grams_and_fisher(model: torch.nn.Module, ids: torch.Tensor, *, micro_batch: int = 8, fisher_samples: int | None = None,
                     progress: bool = True) -> tuple[list[dict[str, InputGram]], list[dict[str, torch.Tensor]], float]:
    """Per layer the o_proj / down_proj input Grams over all of ``ids`` ``[n, T]`` and the Fisher diagonal of the
    residual stream where each projection's output joins it (``f`` ``[d]``: o_proj's output gradient is the
    gradient of the mid-layer residual, down_proj's that of the layer's output), from the first ``fisher_samples``
    sequences (``None``: all) with a backward pass and the rest forward only; and their mean loss. Micro-batches
    never mix the two. The model is only read (its parameters' ``requires_grad`` is restored)."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    device = next(model.parameters()).device
    # on the model's device: the hooks add the device's activations and gradients into them
    grams = [empty_grams(layer, device) for layer in layers]
    hidden = adapter.embeddings(model).weight.shape[1]
    fisher = [{name: torch.zeros(hidden, dtype=torch.float64, device=device) for name in PROJECTIONS} for _ in layers]
    n_fisher = _fisher_windows(fisher_samples, int(ids.shape[0]))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles: list[Any] = []

    def output_hook(sink: torch.Tensor):
        def accumulate(grad: torch.Tensor) -> None:
            sink.add_(grad.detach().double().pow(2).sum((0, 1)).to(sink.device))

        def hook(_module, _args, output):
            if output.requires_grad:
                output.register_hook(accumulate)
        return hook

    def embed_hook(_module, _args, output):
        return output.requires_grad_(True) if torch.is_grad_enabled() else output

    fisher_tokens = int(n_fisher * (ids.shape[1] - 1))
    loss_sum = 0.0
    n = int(ids.shape[0])
    chunks = [(s, min(s + micro_batch, n_fisher), True) for s in range(0, n_fisher, micro_batch)]
    chunks += [(s, min(s + micro_batch, n), False) for s in range(n_fisher, n, micro_batch)]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for l, layer in enumerate(layers):
            for name, linear in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
                handles.append(linear.register_forward_hook(output_hook(fisher[l][name])))
        handles.append(adapter.embeddings(model).register_forward_hook(embed_hook))
        with output_projection_hooks(layers, grams):
            for start, end, with_fisher in tqdm(chunks, desc="Grams and Fisher", disable=not progress, leave=False):
                fault_point("calibration")
                batch = ids[start:end].to(device)
                if not with_fisher:
                    with torch.no_grad():
                        adapter.inner_model(model)(input_ids=batch, use_cache=False)
                    continue
                tokens = int(batch.shape[0] * (batch.shape[1] - 1))
                with torch.enable_grad():
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
    distributed.all_reduce_sum_([f for layer_fisher in fisher for f in layer_fisher.values()])
    fisher_tokens_all, loss_sum = distributed.sum_values(float(fisher_tokens), loss_sum)
    count = max(fisher_tokens_all, 1.0)
    return (grams, [{name: f / count for name, f in layer_fisher.items()} for layer_fisher in fisher],
            loss_sum / count)


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
    fisher_samples: int | None = None,
    curve_samples: int | None = None,
    grams_fisher: tuple[list[dict[str, InputGram]], list[dict[str, torch.Tensor]], float] | None = None,
) -> LayerImportance:
    """Cost curves ``ΔL_l(g)``, ``ΔL_l(c)`` from the Fisher-weighted OBS error after the refit (module docstring),
    on the allocation grid (attention g = 0..Hkv, MLP kept = 0, mlp_step, ..., I). ``attn``/``mlp`` summarise the
    curves at their middle point. ``curve_samples``: measure on the first n windows of ``refit_ids`` only
    (``None``: all); ``fisher_samples``: the Fisher from the first n of those."""
    if mlp_step < 1:
        raise InvalidInputError(f"mlp_step: must be >= 1, got {mlp_step}")
    if curve_samples is not None:
        if curve_samples < 1:
            raise InvalidInputError(f"curve_samples: must be >= 1, got {curve_samples!r}")
        distributed.check_shareable(int(curve_samples), "curve_samples")
        refit_ids = refit_ids[:distributed.local_prefix(int(curve_samples), int(refit_ids.shape[0]))]
    start = time.perf_counter()
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    grams, fisher, base_loss = grams_fisher or grams_and_fisher(model, refit_ids, fisher_samples=fisher_samples,
                                                                     progress=progress)
    attn_curves: list[np.ndarray] = []
    mlp_curves: list[np.ndarray] = []
    for l in tqdm(range(len(layers)), desc="reconstruction curves", disable=not progress, leave=False):
        layer = layers[l]
        geometry = adapter.geometry(model, layer)
        heads = [gqa.q_rows([j], geometry.ratio, geometry.head_dim) for j in range(geometry.num_kv_heads)]
        trace: list[tuple[int, float]] = []
        deepest = geometry.num_kv_heads - (0 if min_kv_groups == 0 else 1)
        structured_obs(layer.self_attn.o_proj.weight, grams[l]["o_proj"], heads, [deepest], damping=damping,
                       row_weights=fisher[l]["o_proj"], trace=trace)
        attn = _curve_from_trace(trace, geometry.num_kv_heads, np.arange(geometry.num_kv_heads + 1))
        if min_kv_groups >= 1 and geometry.num_kv_heads >= 1:
            attn[0] = attn[1]  # never planned (at least one KV group kept)
        trace = []
        structured_obs(layer.mlp.down_proj.weight, grams[l]["down_proj"], [[c] for c in range(geometry.intermediate)],
                       [geometry.intermediate], damping=damping, batch_fraction=batch_fraction,
                       row_weights=fisher[l]["down_proj"], trace=trace)
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
                 "fisher_samples": distributed.global_count(_fisher_windows(fisher_samples, int(refit_ids.shape[0]))),
                 "batch_fraction": batch_fraction,
                 "estimate": "half the Fisher-weighted structured-OBS error after the refit (no pruned evaluations)"},
    )


__all__ = ["PROJECTIONS", "grams_and_fisher", "reconstruction_importance"]
