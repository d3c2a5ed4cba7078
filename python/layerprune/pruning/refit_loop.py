"""Refit the kept weights of a model about to be pruned, layer by layer, from calibration activations.

For decoder layer ``l`` with its kept KV groups and MLP channels chosen, the kept input columns of ``o_proj``
(the kept query heads) and of ``down_proj`` (the kept channels) are refit by least squares to the dense
projection's outputs (:func:`layerprune.refit.refit_output_projection`), and the removed columns are zeroed,
which computes exactly what the pruned layer will. Modes:

* ``lstsq``: the OBS / least-squares refit (SlimGPT, Týr);
* ``lstsq-bias``: the same on centred inputs, with a bias on o_proj and down_proj absorbing the mean;
* ``bias``: FLAP's bias compensation only, ``b = W[:, R] · mean(X[:, R])``, kept weights unchanged.

With ``select="obs"`` the layer's kept KV groups and channels are chosen here, by structured OBS on the same
Gram matrices (:func:`layerprune.refit.obs.structured_obs`: the groups whose removal least increases the error
after the refit, removed one by one with inverse-Hessian updates), and the OBS weights are the refit; only the
counts of the given keep are used.

With ``error_correction`` (SparseGPT, SlimGPT) the calibration inputs of layer ``l`` come from the already
refit layers ``0 .. l-1``, so each layer also corrects what the earlier ones lost; without it every layer
sees the dense model's inputs. Calibration runs in micro-batches; Gram matrices accumulate in float64.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune import distributed
from layerprune.arch import adapter_for, gqa
from layerprune.errors import InternalError, InvalidInputError
from layerprune.models.layer_calls import batch_slice, capture_layer_inputs, check_ids, layer_arguments, model_device
from layerprune.refit import DEFAULT_DAMPING, REFIT_MODES, InputGram, compensation_bias, refit_output_projection
from layerprune.refit.obs import DEFAULT_BATCH_FRACTION, structured_obs
from layerprune.scoring.selection import LayerKeep
from layerprune.faults import fault_point
from layerprune.pruning.surgery import hold_kept_heads_norms

SELECTIONS = ("given", "obs")
ERROR_ROW_BLOCK = 256  # output rows of D at a time in the refit errors' tr(D H Dᵀ)  # the kept columns as given, or chosen by structured OBS



class _SeenInputs:
    """A projection's inputs kept for its refit output (no second pass through the block), up to ``budget``
    bytes (None: all); past it they are dropped and the block is run again."""

    def __init__(self, budget: int | None) -> None:
        self.budget, self.inputs, self.bytes, self.complete = budget, [], 0, True

    def add(self, x: torch.Tensor) -> None:
        if not self.complete:
            return
        self.bytes += x.numel() * x.element_size()
        if self.budget is not None and self.bytes > self.budget:
            self.inputs, self.complete = [], False
        else:
            self.inputs.append(x.detach())


@contextmanager
def _observing(linear: nn.Linear, stats: InputGram, seen: _SeenInputs) -> Iterator[None]:
    """While active, ``linear`` only records its inputs (Gram and the tensors) and returns zeros: the block around
    it is run for those inputs alone, the projection's own product is computed once, after the refit."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        stats.update(x)
        seen.add(x)
        return x.new_zeros(*x.shape[:-1], linear.out_features)

    linear.forward = forward
    try:
        yield
    finally:
        del linear.forward


def _apply(linear: nn.Linear, stats: InputGram, kept: Sequence[int], mode: str, damping: float) -> None:
    """Refit ``linear``'s kept input columns in place and zero the others (its output bias added if needed)."""
    weight = linear.weight
    index = torch.as_tensor(list(kept), dtype=torch.long, device=weight.device)
    with torch.no_grad():
        if mode == "bias":
            new_w, new_b = weight[:, index].clone(), compensation_bias(weight, stats, kept, linear.bias)
        else:
            new_w, new_b = refit_output_projection(weight, stats, kept, damping=damping, bias=linear.bias,
                                                   affine=mode == "lstsq-bias")
        weight.zero_()
        weight[:, index] = new_w
        if new_b is not None:
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                           requires_grad=weight.requires_grad)
            linear.bias.copy_(new_b)


def refit_kept_weights(
    model: nn.Module,
    keep: Sequence[LayerKeep],
    calib_ids: torch.Tensor,
    *,
    mode: str = "lstsq",
    damping: float = DEFAULT_DAMPING,
    error_correction: bool = True,
    micro_batch: int = 8,
    progress: bool = True,
    select: str = "given",
    grams_out: list[dict[str, InputGram]] | None = None,
) -> tuple[dict[str, Any], list[LayerKeep]]:
    """Refit ``model`` (about to be pruned to ``keep``) in place; returns per-layer output errors before/after,
    and the keep the surgery must apply (``keep`` itself, or with ``select="obs"`` the OBS choice of its counts).

    ``keep`` indexes the model's current heads and channels, as the surgery does. The removed columns of
    o_proj / down_proj are zeroed here, so the refit model already computes the pruned model's function;
    the surgery then removes them. Errors are ``mean ‖y_dense − y_refit‖²`` of each projection on its
    calibration inputs, with and without the refit, so the report shows what it bought. ``grams_out`` (a list)
    receives each layer's input Grams of the two projections, as the refit collected them.
    """
    if mode not in REFIT_MODES or mode == "none":
        raise InvalidInputError(f"refit: expected one of {', '.join(REFIT_MODES[1:])}, got {mode!r}")
    if not 0.0 <= damping < 1.0:
        raise InvalidInputError(f"refit damping: must be in [0, 1), got {damping!r}")
    if select not in SELECTIONS or (select == "obs" and mode != "lstsq"):
        raise InvalidInputError(f"select: expected one of {', '.join(SELECTIONS)} (obs with refit lstsq), got {select!r}")
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    if len(keep) != len(layers):
        raise InvalidInputError(f"keep: has {len(keep)} entries, the model has {len(layers)} decoder layers")
    start = time.perf_counter()
    calib_ids = check_ids(calib_ids)
    if error_correction:  # only layer 0's input is needed: the others come from the refit layers below
        hidden, layer_kwargs = layer_arguments(model, input_ids=calib_ids.to(model_device(model)))
        dense_inputs: list[torch.Tensor] = []
    else:
        cache = capture_layer_inputs(model, calib_ids, progress)
        hidden, layer_kwargs, dense_inputs = cache.hidden[0], cache.layer_kwargs, cache.hidden
    errors: list[dict[str, float]] = []
    chosen: list[LayerKeep] = []
    with torch.no_grad():
        for l, (layer, entry) in enumerate(tqdm(list(zip(layers, keep)), desc=f"refit ({mode}, {select})",
                                                disable=not progress, leave=False)):
            fault_point("layer")
            x = hidden if error_correction else dense_inputs[l]
            layer_grams: dict[str, InputGram] | None = None if grams_out is None else {}
            hidden, layer_errors, entry = refit_layer(model, layer, entry, x, layer_kwargs[l], mode=mode,
                                                      damping=damping, micro_batch=micro_batch, select=select,
                                                      grams_out=layer_grams)
            if grams_out is not None:
                grams_out.append(layer_grams)
            errors.append(layer_errors)
            chosen.append(entry)
    report = {"mode": mode, "damping": damping, "error_correction": error_correction, "select": select,
              "calib_tokens": distributed.global_count(calib_ids.numel()), "seconds": time.perf_counter() - start,
              "layers": errors}
    return report, chosen


def refit_layer(
    model: nn.Module,
    layer: nn.Module,
    entry: LayerKeep,
    x: torch.Tensor,
    layer_kwargs: dict[str, Any],
    *,
    mode: str = "lstsq",
    damping: float = DEFAULT_DAMPING,
    micro_batch: int = 8,
    select: str = "given",
    kept_inputs_bytes: int | None = None,
    grams_out: dict[str, InputGram] | None = None,
) -> tuple[torch.Tensor, dict[str, float], LayerKeep]:
    """Refit one decoder layer in place (about to be pruned to ``entry``) on its calibration inputs ``x``
    ``[n, T, d]``, called with ``layer_kwargs`` (the whole batch's; sliced per micro-batch).

    o_proj is refit on the attention inputs of ``x``, then down_proj on the MLP inputs of the refit
    attention's output. Returns the refit layer's output on ``x``, the two projections' output errors
    (masked and refit, see :func:`refit_kept_weights`; with OBS "masked" is the OBS choice unrefit) and the
    keep (``entry``, or the OBS choice of its counts with ``select="obs"``). ``kept_inputs_bytes``: how much of a
    projection's inputs is kept for its refit output (None: all); past it the block runs a second time.
    The bias compensation (``mode="bias"``, given columns) collects the Gram of the removed columns only.
    ``grams_out`` (a dict) receives the two projections' input Grams. q/k norms over whole projections (OLMo-2) are
    held at the kept heads (:func:`~layerprune.pruning.surgery.hold_kept_heads_norms`) before o_proj's inputs are
    collected, or, when OBS chooses the heads, after its choice (OBS then chose on the dense norms' outputs).
    """
    adapter = adapter_for(model)
    n = x.shape[0]
    chunks = [(s, min(s + micro_batch, n)) for s in range(0, n, micro_batch)]
    geometry = adapter.geometry(model, layer)
    ratio, head_dim = geometry.ratio, geometry.head_dim
    layer_errors: dict[str, float] = {}
    chosen: dict[str, tuple[int, ...]] = {}

    def run(block, inputs, target: nn.Linear, name: str, groups: list[list[int]], kept_units: Sequence[int],
            batch_fraction: float | None) -> torch.Tensor:
        """Collect target's input Gram over the chunks, choose (OBS) and refit, return the block's refit output."""
        removed = None
        if mode == "bias" and select == "given":
            kept_set = {c for i in kept_units for c in groups[i]}
            removed = [c for c in range(target.in_features) if c not in kept_set]
        stats = InputGram.empty(target.in_features, device=target.weight.device, columns=removed)
        dense_w = target.weight.detach().clone()
        seen = _SeenInputs(kept_inputs_bytes)  # target's inputs: its refit output is computed from them

        def run_block():
            for s, e in chunks:
                yield block(inputs[s:e], {k: batch_slice(v, s, e, n) for k, v in layer_kwargs.items()})

        with _observing(target, stats, seen):
            for _ in run_block():
                pass
        InputGram.all_reduce([stats])  # data-parallel: every rank's calibration rows
        if grams_out is not None:
            grams_out[name] = stats
        dense_b = None if target.bias is None else target.bias.detach().clone()
        if select == "obs":
            stage = structured_obs(dense_w, stats, groups, [len(groups) - len(kept_units)], damping=damping,
                                   batch_fraction=batch_fraction)[-1]
            removed = set(stage.removed)
            kept_units = tuple(i for i in range(len(groups)) if i not in removed)
            with torch.no_grad():
                target.weight.copy_(stage.weight.to(target.weight))
            del stage  # its float64 weights
        chosen[name] = tuple(kept_units)
        kept = [c for i in kept_units for c in groups[i]]
        masked = torch.zeros_like(dense_w)
        masked[:, kept] = dense_w[:, kept]
        layer_errors[f"{name}_masked"] = _output_error(dense_w, dense_b, masked, dense_b, stats)
        del masked
        if select != "obs":
            _apply(target, stats, kept, mode, damping)
        layer_errors[f"{name}_refit"] = _output_error(dense_w, dense_b, target.weight, target.bias, stats)
        if name == "o_proj" and select == "obs" and hold_kept_heads_norms(adapter, layer.self_attn, kept_units, ratio,
                                                                          head_dim):
            return torch.cat(list(run_block()))  # OLMo-2: the chosen heads' norms changed the block's output
        if seen.complete:  # the branch's output from the refit projection's (a post-norm or scale after it)
            return torch.cat([adapter.branch_output(layer, name, target(x_in)) for x_in in seen.inputs])
        return torch.cat(list(run_block()))  # the block again, the refit projection in it: the same inputs

    head_groups = [gqa.q_rows([j], ratio, head_dim) for j in range(geometry.num_kv_heads)]
    channel_groups = [[c] for c in range(geometry.intermediate)]
    if select == "given":  # OLMo-2: the kept heads' q/k norms, before o_proj's inputs are collected
        hold_kept_heads_norms(adapter, layer.self_attn, entry.kv_heads, ratio, head_dim)
    with torch.no_grad():
        mid = x + run(lambda h, kw: adapter.attention_block(layer, h, kw), x, layer.self_attn.o_proj, "o_proj",
                      head_groups, entry.kv_heads, None)
        out = mid + run(lambda h, kw: adapter.mlp_block(layer, h), mid, layer.mlp.down_proj, "down_proj",
                        channel_groups, entry.mlp_channels, DEFAULT_BATCH_FRACTION)
    return out, layer_errors, LayerKeep(kv_heads=chosen["o_proj"], mlp_channels=chosen["down_proj"])


def _output_error(dense_w: torch.Tensor, dense_b: torch.Tensor | None, new_w: torch.Tensor,
                  new_b: torch.Tensor | None, stats: InputGram) -> float:
    """``mean ‖(W x + b) − (W' x + b')‖²`` over the collected inputs, from their Gram ``H/n`` and mean ``μ``:
    ``tr(D H/n Dᵀ) + 2 δᵀ D μ + ‖δ‖²`` with ``D = W − W'``, ``δ = b − b'`` (a missing bias is zero). A Gram of
    some columns only (``stats.columns``) serves when ``D`` is zero outside them; where ``D`` is zero outside at most
    half the columns (the masked error: the removed ones), only their block of ``H`` is read."""
    changed = torch.nonzero((dense_w != new_w).any(0)).flatten()
    if stats.columns is None and 2 * changed.numel() > dense_w.shape[1]:
        def d_rows(r: int) -> torch.Tensor:  # D's rows in float64, a block at a time: never a whole float64 copy
            block = slice(r, r + ERROR_ROW_BLOCK)
            return dense_w[block].to(stats.gram.device, torch.float64) - new_w[block].to(stats.gram.device, torch.float64)
        gram, mean = stats.gram, stats.mean
    elif stats.columns is None:  # D is zero outside a few columns (the masked error: the removed ones): their block
        index = changed.to(stats.gram.device)
        gram = stats.gram.index_select(0, index).index_select(1, index)
        d = (dense_w.index_select(1, changed) - new_w.index_select(1, changed)).to(stats.gram.device, torch.float64)
        mean = stats.mean[index]

        def d_rows(r: int) -> torch.Tensor:
            return d[r:r + ERROR_ROW_BLOCK]
    else:  # D is those columns' difference alone (the others checked equal): never a whole float64 copy
        columns = stats.columns.to(dense_w.device)
        outside = torch.ones(dense_w.shape[1], dtype=torch.bool, device=dense_w.device)
        outside[columns] = False
        outside_index = torch.nonzero(outside).flatten()
        if not torch.equal(dense_w.index_select(1, outside_index), new_w.index_select(1, outside_index)):
            raise InternalError("refit error: the weights changed outside the columns whose Gram was collected")
        d = (dense_w.index_select(1, columns) - new_w.index_select(1, columns)).to(stats.gram.device, torch.float64)
        gram, mean = stats.gram, stats.mean[stats.columns]

        def d_rows(r: int) -> torch.Tensor:
            return d[r:r + ERROR_ROW_BLOCK]
    value, d_mean = 0.0, []
    for r in range(0, dense_w.shape[0], ERROR_ROW_BLOCK):  # tr(D H Dᵀ) and D μ, rows in blocks
        rows = d_rows(r)
        value += float(((rows @ gram) * rows).sum())
        d_mean.append(rows @ mean.to(rows.device))
    value /= max(stats.count, 1)
    dm = torch.cat(d_mean)
    zero = torch.zeros(dense_w.shape[0], dtype=torch.float64, device=dm.device)
    delta = ((zero if dense_b is None else dense_b.to(dm)) - (zero if new_b is None else new_b.to(dm)))
    value = value + 2 * delta @ dm + delta @ delta
    return float(value)


__all__ = ["SELECTIONS", "refit_kept_weights", "refit_layer"]
