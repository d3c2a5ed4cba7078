"""Layer-by-layer pruning of checkpoints larger than memory: one decoder layer's weights at a time.

The model is a skeleton on the meta device (:func:`layerprune.models.checkpoint.empty_model`); each decoder
layer's tensors are read from the safetensors checkpoint when the engine reaches it and freed before the next
(SparseGPT's and Wanda's layer loops, llm-compressor's sequential pipeline). The calibration batches enter
as hidden states and go through the layers one layer at a time; they live in a
:class:`~layerprune.pruning.hidden_states.HiddenStatePool` (the device, RAM, then files on disk).
The embedding matrix is never held whole: the batches are embedded from the rows of their tokens, and the
matrix goes to the output in blocks of rows. The final norm and ``lm_head`` are read where the losses need
them; a head matrix heavier than two layers (Llama-3.2-3B's tied 128k vocabulary weighs four) is read in
row blocks, once per loss, and the loss is a streaming log-sum-exp over the blocks
(:func:`layerprune.models.layer_calls.head_loss`), equal to the whole matrix's to float rounding.

Two passes over the weights when the allocation needs every layer first (``mode="unbalanced"``):

1. **importance**: per layer the dense element scores (Wanda's activation norms, or |W| / W²) and its share of
   the layer importance: Block Influence from its input and output; removal and sensitivity curves start
   perturbed copies of the hidden states (the layer, its attention or its MLP skipped; the layer pruned to
   each sampled width) that every later layer then carries, and their losses are read at the head, so the
   figures are exactly :mod:`layerprune.importance`'s (``loss_from_layer`` on the same states);
2. **prune**: the allocation is solved, then per layer: the kept KV groups and channels (the pass-1 scores;
   rescored on the partially pruned layer for ``iterative_steps > 1``), the refit on the refit batch
   (error correction: that batch comes through the refit layers), the GQA surgery, and the layer's tensors
   are written to the output shards.

``mode="flap"``: the first pass measures FLAP's fluctuation scores on the refit batch
(:func:`layerprune.pruning.flap.layer_fluctuation`), its global threshold sets the widths, the second prunes.
``mode="uniform"`` needs no importance: one pass. With the same settings the result is the in-memory
:func:`layerprune.pruning.prune`'s: the same batches through the same module code, the same kept heads and
channels, the same allocation (tested on every family).

Forward-only importance only: a gradient score (``taylor`` and its variants) needs a backward pass through the
whole model and is refused (:func:`layerprune.pruning.config.resolve_config` for the ``layers`` executor).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune.allocation import allocate
from layerprune.arch import OUTPUT_BIAS_KEY, adapter_for, layer_shapes, per_token_costs
from layerprune.arch.modeling_layerprune import LAYER_WIDTH_KEYS, resize_decoder_layers
from layerprune.errors import InternalError, InvalidInputError, ModelError, NumericalError
from layerprune.importance import LayerImportance
from layerprune.importance.block_influence import block_influence
from layerprune.importance.depth import depth_importance
from layerprune.importance.losses import increase
from layerprune.models.layer_calls import HeadBlocks, batch_slice, head_loss, layer_arguments, layer_call
from layerprune.importance.sensitivity import curve_points, pruned_layer_outputs, sensitivity_result
from layerprune.models import count_parameters
from layerprune.models.checkpoint import (
    SafetensorsCheckpoint,
    empty_model,
    load_module,
    release_module,
)
from layerprune.pruning.executor import (GLIBC_MMAP_THRESHOLD_MAX, hidden_state_budget,
                                         return_freed_memory_to_the_system)
from layerprune.pruning.flap import flap_allocation, layer_fluctuation
from layerprune.pruning.hidden_states import HiddenStatePool, StoredHidden
from layerprune.pruning.config import PruneConfig, resolve_config, solver_for, validate_against_model
from layerprune.pruning.pipeline import (
    PruneResult,
    build_report,
    calibration_ids,
    check_dense,
    check_feasible,
    check_importance,
    checked_calibration,
    device_time,
    per_token_report,
    refit_batch,
    seed_everything,
    spec_for_model,
    step_targets,
)
from layerprune.pruning.refit_loop import refit_layer
from layerprune.refit import BIAS_MODES
from layerprune.pruning.surgery import prune_decoder_layer
from layerprune.refit import InputGram
from layerprune.refit.grams import empty_grams, output_projection_hooks
from layerprune.scoring.dispatch import ActivationStats, wanda_channel_scores, weight_scores
from layerprune.scoring.groups import fold_layer_scores
from layerprune.scoring.selection import LayerKeep, select_keep
from layerprune.faults import fault_point

GRAM_MICRO_BATCH = 8  # output_projection_grams' micro-batch: the refit statistics see the same batches
ROW_BLOCK_BYTES = 64 * 2**20  # embeddings and lm_head are read and written in blocks of rows of at most this size ...
ROW_BLOCK_LAYER_SHARE = 0.5  # ... and of at most this share of the largest layer (as are the losses' logits chunks)
RESIDENT_HEAD_LAYERS = 1  # the head matrix is held whole for the losses when it weighs at most this many layers
KEPT_INPUT_LAYERS = 1  # the refit keeps a projection's inputs up to this many layers' bytes, else runs the block again


class TensorSink(Protocol):
    """Where the pruned model's tensors go: ``plan`` once the allocation fixes every shape (tensors written
    before it are staged), ``write`` each one as soon as it is final."""

    def plan(self, tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None: ...

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def write_rows(self, name: str, rows: torch.Tensor, start: int, shape: tuple[int, ...]) -> None: ...


@dataclass
class SequentialOptions:
    """``device``: where each layer runs (``cuda`` moves one layer at a time). ``hidden_budget_bytes``: host RAM
    for the calibration hidden states before they spill to files in ``spill_dir`` (default: a temporary folder);
    None: :func:`layerprune.pruning.executor.hidden_state_budget` of ``max_memory`` (default: a quarter of the
    checkpoint). ``device_budget_bytes``: on CUDA, device memory they may use (default: a quarter of what is
    free at the start)."""

    device: str | torch.device = "cpu"
    hidden_budget_bytes: int | None = None
    device_budget_bytes: int | None = None
    spill_dir: str | Path | None = None
    max_memory: int | None = None


class _Clock:
    """Exclusive wall time per stage: a nested stage pauses the one around it. Every read waits for the work queued
    on ``device`` (:func:`~layerprune.pruning.pipeline.device_time`)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        now = device_time(self.device)
        if self._stack:
            outer, since = self._stack[-1]
            self.totals[outer] = self.totals.get(outer, 0.0) + now - since
        self._stack.append((stage, now))
        try:
            yield
        finally:
            end = device_time(self.device)
            _, since = self._stack.pop()
            self.totals[stage] = self.totals.get(stage, 0.0) + end - since
            if self._stack:
                self._stack[-1] = (self._stack[-1][0], end)


def _qualified_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


class _Engine:
    def __init__(self, checkpoint: SafetensorsCheckpoint, model_config: Any, config: PruneConfig, sink: TensorSink,
                 dtype: torch.dtype, options: SequentialOptions, progress: bool) -> None:
        self.ckpt, self.config, self.sink, self.dtype, self.progress = checkpoint, config, sink, dtype, progress
        checkpoint.split_fused(model_config)
        self.device = torch.device(options.device)
        self.model = empty_model(model_config, dtype)
        self.adapter = adapter_for(self.model)
        self.layers = self.adapter.decoder_layers(self.model)
        self.names = _qualified_names(self.model)
        self.clock = _Clock(self.device)
        self.records: list[dict[str, Any]] = []
        self.max_layer_bytes = 0
        device_budget = options.device_budget_bytes
        if device_budget is None and self.device.type == "cuda":
            device_budget = torch.cuda.mem_get_info(self.device)[0] // 4
        self._tied_model = self._tied()
        self._embed_name = self._name(self.model.get_input_embeddings()) + ".weight"
        self._head_name = self._embed_name if self._tied_model else self._name(self.adapter.lm_head(self.model)) + ".weight"
        largest = layer_bytes(checkpoint, model_config, dtype)[0]
        # blocks of the embeddings / head and chunks of the losses' logits: a share of a layer, so that the head's
        # working set scales with the model (a fixed 64 MiB block would outweigh a small model's layers)
        self.block_bytes = min(ROW_BLOCK_BYTES, max(2**20, int(ROW_BLOCK_LAYER_SHARE * largest)))
        ram_budget = options.hidden_budget_bytes
        if ram_budget is None:
            head = checkpoint.nbytes([self._head_name], dtype)
            head_working = head if head <= RESIDENT_HEAD_LAYERS * largest else min(head, 4 * self.block_bytes)
            ram_budget = hidden_state_budget(options.max_memory, largest, head_working, checkpoint.nbytes(dtype=dtype))
        self.pool = HiddenStatePool(self.device, ram_budget_bytes=ram_budget, device_budget_bytes=device_budget or 0,
                                    spill_dir=options.spill_dir)
        for module in self.model.modules():  # the skeleton's buffers (rotary frequencies) are real: to the device
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[key] = buffer.to(self.device)

    # ---- weights -----------------------------------------------------------------------------------

    def _name(self, module: nn.Module) -> str:
        return self.names[id(module)]

    def _tied(self) -> bool:
        return self.adapter.lm_head(self.model).weight is self.model.get_input_embeddings().weight

    def load(self, module: nn.Module) -> int:
        with self.clock("read"):
            held = load_module(self.model, self._name(module), self.ckpt, self.dtype, self.device)
        if self._tied_model:
            self.model.tie_weights()
        return held

    def release(self, module: nn.Module) -> None:
        release_module(module)
        if self._tied_model:
            self.model.tie_weights()

    def write_module(self, module: nn.Module) -> None:
        prefix = self._name(module)
        with self.clock("write"):
            for local, tensor in module.state_dict().items():
                self.sink.write(f"{prefix}.{local}" if prefix else local, tensor)

    def copy_rows(self, name: str) -> None:
        """Write checkpoint tensor ``name`` to the output in blocks of rows (an embedding never whole in memory)."""
        entry = self.ckpt.entries[name]
        rows = entry.shape[0]
        step = self.rows_per_block(entry)
        for start in range(0, rows, step):
            with self.clock("read"):
                block = self.ckpt.read_rows(name, start, min(start + step, rows), self.dtype)
            with self.clock("write"):
                self.sink.write_rows(name, block, start, entry.shape)

    def rows_per_block(self, entry: Any) -> int:
        """Rows of checkpoint tensor ``entry`` in one block of at most ``block_bytes`` (at least one)."""
        return max(1, self.block_bytes // max(1, entry.nbytes // entry.shape[0]))

    def head_blocks(self) -> HeadBlocks:
        """The ``lm_head`` matrix read in row blocks of ``block_bytes``, ``(first row, rows)`` each, for
        :func:`layerprune.models.layer_calls.head_loss` (which reads each block once per loss)."""
        entry = self.ckpt.entries[self._head_name]
        vocab = entry.shape[0]
        step = self.rows_per_block(entry)

        def blocks() -> Iterator[tuple[int, torch.Tensor]]:
            for start in range(0, vocab, step):
                with self.clock("read"):
                    block = self.ckpt.read_rows(self._head_name, start, min(start + step, vocab), self.dtype,
                                                self.device)
                yield start, block

        return blocks

    # ---- the calibration batches enter -----------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``ids``: only the rows of the tokens that occur are read (a lookup copies rows, so
        this is the full embedding's output exactly, times its scale where it has one)."""
        tokens, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        with self.clock("read"):
            rows = self.ckpt.read_row_set(self._embed_name, tokens, self.dtype, self.device)
        return self.adapter.scale_embeddings(self.model, torch.nn.functional.embedding(inverse.to(self.device), rows))

    def capture_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The hidden state entering layer 0 and the keyword arguments every layer is passed
        (:func:`layerprune.models.layer_calls.layer_arguments` on the embeddings read from the checkpoint)."""
        return layer_arguments(self.model, inputs_embeds=self.embed(ids))

    # ---- element scores ------------------------------------------------------------------------------

    def forward_scores(self, l: int, layer: nn.Module, x: torch.Tensor | None,
                       kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(the layer's output on ``x``, KV-group scores, channel scores) as :func:`element_group_scores` gives
        them on the whole model: ``activation`` collects each projection's input norms during the forward."""
        importance = self.config.importance
        prefix = self.adapter.layer_prefix(l)
        projections = {f"{prefix}.{n}": lin for n, lin in self.adapter.projections(layer).items()}
        geometry = self.adapter.geometry(self.model, layer)
        if importance != "activation":
            y = None if x is None else layer_call(layer, x, kwargs)
            with self.clock("element_scores"):
                kv, ch = fold_layer_scores(
                    geometry, prefix,
                    lambda n: weight_scores(projections[n].weight.detach(), kind=importance, axis=0),
                    lambda n: weight_scores(projections[n].weight.detach(), kind=importance, axis=1))
            return y, kv, ch
        if x is None:
            raise InternalError("activation scores need the layer's calibration inputs")
        stats = {name: ActivationStats() for name in projections}
        handles = [lin.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0]))
                   for name, lin in projections.items()]
        try:
            with self.clock("element_scores"):
                y = layer_call(layer, x, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        with self.clock("element_scores"):
            kv, ch = fold_layer_scores(
                geometry, prefix,
                lambda n: wanda_channel_scores(projections[n].weight.detach(), stats[n], axis=0),
                lambda n: wanda_channel_scores(projections[n].weight.detach(), stats[n], axis=1))
        return y, kv, ch

    def observe(self, layer: nn.Module, stream: StoredHidden, kwargs: dict[str, Any],
                sinks: Mapping[str, Any]) -> None:
        """Run ``stream`` through the layer in the micro-batches of
        :func:`layerprune.refit.grams.observe_output_projection_inputs`, handing the o_proj / down_proj inputs to
        ``sinks``; advances ``stream``."""
        x = stream.get()
        n = x.shape[0]
        with output_projection_hooks([layer], [sinks]):
            out = torch.cat([layer_call(layer, x[s:s + GRAM_MICRO_BATCH],
                                        {k: batch_slice(v, s, min(s + GRAM_MICRO_BATCH, n), n) for k, v in kwargs.items()})
                             for s in range(0, n, GRAM_MICRO_BATCH)])
        stream.set(out)

    def refit_grams(self, layer: nn.Module, stream: StoredHidden, kwargs: dict[str, Any]) -> dict[str, InputGram]:
        """The dense layer's o_proj / down_proj input Grams on the refit batch (as
        :func:`layerprune.refit.output_projection_grams`); advances ``stream``."""
        grams = empty_grams(layer, device=self.device)
        self.observe(layer, stream, kwargs, grams)
        return grams

    # ---- FLAP's pass: fluctuation scores ---------------------------------------------------------

    def fluctuation_pass(self, refit_x0: StoredHidden,
                         refit_kwargs: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer FLAP's (KV-group, channel) fluctuation on the refit batch through the dense layers
        (:func:`layerprune.pruning.flap.fluctuation_scores` on the same batches)."""
        stream = self.pool.store(refit_x0.get())
        scores = []
        try:
            for l, layer in enumerate(tqdm(self.layers, desc="layer by layer: fluctuation", disable=not self.progress,
                                           leave=False)):
                fault_point("layer")
                t0, read0 = device_time(self.device), self.clock.totals.get("read", 0.0)
                self.max_layer_bytes = max(self.max_layer_bytes, self.load(layer))
                stats = {"o_proj": ActivationStats(), "down_proj": ActivationStats()}
                with torch.no_grad(), self.clock("element_scores"):
                    self.observe(layer, stream, refit_kwargs[l], stats)
                    scores.append(layer_fluctuation(self.adapter.geometry(self.model, layer), layer, stats["o_proj"],
                                                    stats["down_proj"]))
                self.release(layer)
                self._record(l, "importance", t0, read0)
        finally:
            stream.free()
        return scores

    # ---- pass 1: element scores and layer importance ---------------------------------------------

    def importance_pass(self, calib: StoredHidden, kwargs: list[dict[str, Any]], labels: torch.Tensor,
                        refit_x0: StoredHidden | None, refit_kwargs: list[dict[str, Any]] | None,
                        ) -> tuple[LayerImportance, list[tuple[torch.Tensor, torch.Tensor]]]:
        config, adapter = self.config, self.adapter
        method = config.layer_importance
        start = time.perf_counter()
        n = calib.shape[0]
        n_sub = n if method != "sensitivity" or config.curve_samples is None else min(config.curve_samples, n)
        sub_kwargs = [{k: batch_slice(v, 0, n_sub, n) for k, v in kw.items()} for kw in kwargs] if n_sub < n else kwargs
        main = self.pool.store(calib.get())
        grams_stream = None
        if method == "sensitivity" and config.refit != "none" and refit_x0 is not None:
            grams_stream = self.pool.store(refit_x0.get())
        scores: list[tuple[torch.Tensor, torch.Tensor]] = []
        # perturbed copies of the hidden states: (layer perturbed, part, kept, slot); a slot enters layer + 1
        probes: list[tuple[int, str, int, StoredHidden]] = []
        block = {part: np.zeros(len(self.layers)) for part in ("attn", "mlp", "combined")}
        geometries, grams_tokens = [], 0
        try:
            for l, layer in enumerate(tqdm(self.layers, desc=f"layer by layer: {method} importance",
                                           disable=not self.progress, leave=False)):
                fault_point("calibration" if l == 0 else "layer")
                t0, read0 = device_time(self.device), self.clock.totals.get("read", 0.0)
                self.max_layer_bytes = max(self.max_layer_bytes, self.load(layer))
                geometry = adapter.geometry(self.model, layer)
                geometries.append(geometry)
                with torch.no_grad(), self.clock("layer_importance"):
                    grams = None
                    if grams_stream is not None and refit_kwargs is not None:
                        grams = self.refit_grams(layer, grams_stream, refit_kwargs[l])
                        grams_tokens = grams["o_proj"].count
                    x = main.get()
                    if config.importance == "obs":  # the curves' points are chosen by OBS on the Grams
                        y, kv, ch = layer_call(layer, x, kwargs[l]), None, None
                    else:
                        y, kv, ch = self.forward_scores(l, layer, x, kwargs[l])
                    scores.append((kv, ch))
                    if method == "activation":
                        mid = x + adapter.attention_block(layer, x, kwargs[l])
                        block["attn"][l] = block_influence(x, mid)
                        block["mlp"][l] = block_influence(mid, y)
                        block["combined"][l] = block_influence(x, y)
                    elif method == "removal":
                        probes.append((l, "combined", 0, self.pool.store(x)))
                        probes.append((l, "attn", 0, self.pool.store(
                            adapter.layer_forward(layer, x, kwargs[l], skip_attn=True), copy=False)))
                        probes.append((l, "mlp", 0, self.pool.store(
                            adapter.layer_forward(layer, x, kwargs[l], skip_mlp=True), copy=False)))
                    else:
                        g_points, c_points = curve_points(geometry, mlp_step=config.mlp_step,
                                                          min_kv_groups=config.min_kv_groups)
                        for part, kept, out in pruned_layer_outputs(
                                adapter, layer, geometry, x[:n_sub], sub_kwargs[l], kv, ch, g_points, c_points,
                                grams=grams, refit=config.refit, refit_damping=config.refit_damping):
                            probes.append((l, part, kept, self.pool.store(out, copy=False)))
                    for origin, _part, _kept, slot in probes:
                        if origin < l:
                            slot.set(layer_call(layer, slot.get(), sub_kwargs[l]))
                    main.set(y)
                self.release(layer)
                self._record(l, "importance", t0, read0)
            if grams_stream is not None:
                grams_stream.free()
            with torch.no_grad():
                base, losses = self.head_losses(main, labels, probes, n_sub)
        finally:
            main.free()
            for *_, slot in probes:
                slot.free()
        seconds = time.perf_counter() - start
        tokens = int(labels.numel())
        if method == "activation":
            for part, arr in block.items():
                if not np.all(np.isfinite(arr)):
                    raise NumericalError(f"block influence ({part}) is not finite")
            li = LayerImportance(method="activation", attn=block["attn"], mlp=block["mlp"], combined=block["combined"],
                                 metric="block_influence", base_loss=base[0], seconds=seconds,
                                 details={"calib_tokens": tokens})
        elif method == "removal":
            parts = {part: np.zeros(len(self.layers)) for part in ("attn", "mlp", "combined")}
            for (origin, part, _k, _s), loss in zip(probes, losses):
                parts[part][origin] = increase(loss, base[0], config.removal_metric)
            li = LayerImportance(method="removal", attn=parts["attn"], mlp=parts["mlp"], combined=parts["combined"],
                                 metric=config.removal_metric, base_loss=base[0], seconds=seconds,
                                 details={"calib_tokens": tokens, "sub_blocks": True})
        else:
            attn_samples = [{g.num_kv_heads: 0.0} for g in geometries]
            mlp_samples = [{g.intermediate: 0.0} for g in geometries]
            for (origin, part, kept, _s), loss in zip(probes, losses):
                (attn_samples if part == "attn" else mlp_samples)[origin][kept] = increase(loss, base[1], "loss")
            refit_details = None if grams_stream is None else {
                "mode": config.refit, "damping": config.refit_damping, "tokens": int(grams_tokens)}
            li = sensitivity_result(geometries, attn_samples, mlp_samples, mlp_step=config.mlp_step, metric="loss",
                                    base_loss=base[1], seconds=seconds, calib_tokens=int(labels[:n_sub].numel()),
                                    refit_details=refit_details)
        return li, scores

    def head_losses(self, main: StoredHidden, labels: torch.Tensor, probes: list[tuple[int, str, int, StoredHidden]],
                    n_sub: int) -> tuple[tuple[float, float], list[float]]:
        """((base loss, base loss of the first ``n_sub`` samples), the loss of every probe) through the final
        norm and lm_head, which are read here, written to the output and freed."""
        norm, head = self._head_modules()
        self.load(norm)
        # The head matrix is held whole only when it weighs at most two layers (a 128k vocabulary outweighs
        # four Llama-3.2-3B layers); otherwise it is read in row blocks for every four samples' logits.
        resident = self.ckpt.nbytes([self._head_name], self.dtype) <= RESIDENT_HEAD_LAYERS * self.max_layer_bytes
        head_blocks = None
        if resident:
            self.load(head)
        else:
            if getattr(self.adapter.lm_head(self.model), "bias", None) is not None:
                raise ModelError("model: lm_head has a bias, which layerprune's families never have")
            head_blocks = self.head_blocks()
        with self.clock("layer_importance"):
            final = main.get()
            base = head_loss(self.model, final, labels, head_blocks=head_blocks, logits_bytes=self.block_bytes)
            if not math.isfinite(base):
                raise NumericalError(f"calibration loss of the dense model is {base} (overflow in {self.dtype}?)")
            base_sub = base if n_sub == final.shape[0] else head_loss(
                self.model, final[:n_sub], labels[:n_sub], head_blocks=head_blocks, logits_bytes=self.block_bytes)
            losses = []
            for origin, _part, _kept, slot in tqdm(probes, desc="losses of the perturbed layers",
                                                   disable=not self.progress or not probes, leave=False):
                hidden = slot.get()
                loss = head_loss(self.model, hidden, labels[:hidden.shape[0]], head_blocks=head_blocks,
                                 logits_bytes=self.block_bytes)
                if not math.isfinite(loss):
                    raise NumericalError(f"calibration loss became {loss} after perturbing layer {origin}")
                losses.append(loss)
        self.write_head()
        return (base, base_sub), losses

    def _head_modules(self) -> list[nn.Module]:
        """The final norm and lm_head (the embedding when lm_head is tied to it)."""
        head = self.model.get_input_embeddings() if self._tied_model else self.adapter.lm_head(self.model)
        return [self.adapter.final_norm(self.model), head]

    def write_head(self) -> None:
        """Write the final norm and an untied lm_head to the output (the matrix in row blocks unless it is held
        already); free them."""
        for module in self._head_modules():
            held = not any(p.device.type == "meta" for p in module.parameters())
            if module is self.model.get_input_embeddings():  # tied: written with the embeddings
                pass
            elif held:
                self.write_module(module)
            elif module is self.adapter.lm_head(self.model):
                self.copy_rows(self._head_name)
            else:
                self.load(module)
                self.write_module(module)
            self.release(module)

    # ---- pass 2: prune, refit, write -----------------------------------------------------------------

    def prune_pass(self, alloc: Any, dense_scores: list[tuple[torch.Tensor, torch.Tensor]] | None,
                   calib_x0: StoredHidden, kwargs: list[dict[str, Any]], refit_x0: StoredHidden | None,
                   refit_kwargs: list[dict[str, Any]] | None) -> tuple[list[list[int]], list[list[int]], dict | None]:
        config, adapter = self.config, self.adapter
        steps = config.iterative_steps
        shapes = layer_shapes(self.model)
        full_kv = [s["num_kv_heads"] for s in shapes]
        full_mlp = [s["intermediate"] for s in shapes]
        final_kv = [int(a.kv_groups_kept) for a in alloc.layers]
        final_mlp = [int(a.mlp_kept) for a in alloc.layers]
        targets = {k: (step_targets(full_kv, final_kv, k, steps), step_targets(full_mlp, final_mlp, k, steps))
                   for k in range(1, steps + 1)}
        # streams[k]: the calibration batch through the layers as step k leaves them (k = 0: dense), where the
        # activation scores of step k + 1 are measured
        streams: dict[int, StoredHidden] = {}
        if config.importance == "activation":
            for k in range(0 if dense_scores is None else 1, steps):
                streams[k] = self.pool.store(calib_x0.get())
        refit_stream = None if refit_x0 is None else self.pool.store(refit_x0.get())
        kept_kv: list[list[int]] = []
        kept_mlp: list[list[int]] = []
        refit_errors: list[dict[str, float]] = []
        refit_start = self.clock.totals.get("refit", 0.0)
        try:
            for l, layer in enumerate(tqdm(self.layers, desc="layer by layer: prune and write",
                                           disable=not self.progress, leave=False)):
                fault_point("layer")
                t0, read0 = device_time(self.device), self.clock.totals.get("read", 0.0)
                self.max_layer_bytes = max(self.max_layer_bytes, self.load(layer))
                geometry = adapter.geometry(self.model, layer)
                kv_idx, mlp_idx = list(range(full_kv[l])), list(range(full_mlp[l]))
                with torch.no_grad():
                    for k in range(1, steps + 1):
                        if config.importance == "obs":  # one step: the refit chooses, these are the counts
                            kv = ch = None
                        elif k == 1 and dense_scores is not None:
                            kv, ch = dense_scores[l]
                        else:
                            stream = streams.get(k - 1)
                            y, kv, ch = self.forward_scores(l, layer, None if stream is None else stream.get(), kwargs[l])
                            if stream is not None:
                                stream.set(y)
                        with self.clock("pruning"):
                            if kv is None:
                                entry = LayerKeep(tuple(range(targets[k][0][l])), tuple(range(targets[k][1][l])))
                            else:
                                entry = select_keep([kv], [ch], [targets[k][0][l]], [targets[k][1][l]])[0]
                        if k == steps and refit_stream is not None and refit_kwargs is not None:
                            with self.clock("refit"):
                                errors, entry = self.refit(layer, entry, refit_stream, refit_kwargs[l])
                                refit_errors.append(errors)
                        with self.clock("pruning"):
                            geometry = prune_decoder_layer(adapter, layer, geometry, entry)
                        kv_idx = [kv_idx[i] for i in entry.kv_heads]
                        mlp_idx = [mlp_idx[i] for i in entry.mlp_channels]
                kept_kv.append(kv_idx)
                kept_mlp.append(mlp_idx)
                self.write_module(layer)
                self.release(layer)
                self._record(l, "prune", t0, read0)
        finally:
            for slot in streams.values():
                slot.free()
            if refit_stream is not None:
                refit_stream.free()
        refit_report = None
        if refit_x0 is not None:
            refit_report = {"mode": config.refit, "damping": config.refit_damping,
                            "error_correction": config.refit_error_correction,
                            "select": "obs" if config.importance == "obs" else "given",
                            "calib_tokens": int(math.prod(refit_x0.shape[:2])),
                            "seconds": self.clock.totals.get("refit", 0.0) - refit_start, "layers": refit_errors}
        return kept_kv, kept_mlp, refit_report

    def refit(self, layer: nn.Module, entry: LayerKeep, stream: StoredHidden,
              kwargs: dict[str, Any]) -> tuple[dict[str, float], LayerKeep]:
        """Refit the layer on the refit batch as :func:`refit_kept_weights` does (with ``importance="obs"`` the
        kept groups chosen there too); advance the batch through the refit layer (error correction) or the layer
        as it was (inputs of the unrefit model). Returns the errors and the keep to apply."""
        x = stream.get()
        following = None if self.config.refit_error_correction else layer_call(layer, x, kwargs)
        out, errors, entry = refit_layer(self.model, layer, entry, x, kwargs, mode=self.config.refit,
                                         kept_inputs_bytes=KEPT_INPUT_LAYERS * self.max_layer_bytes,
                                         damping=self.config.refit_damping,
                                         select="obs" if self.config.importance == "obs" else "given")
        stream.set(out if following is None else following)
        return errors, entry

    def _record(self, l: int, stage: str, t0: float, read0: float) -> None:
        self.records.append({"layer": l, "pass": stage, "seconds": round(device_time(self.device) - t0, 4),
                             "read_seconds": round(self.clock.totals.get("read", 0.0) - read0, 4)})


def _manifest(model: nn.Module, alloc: Any, output_bias: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor the pruned folder holds: the skeleton resized to the allocation's
    widths by the remote-code module the folder loads with (a tied lm_head stored once, as the embedding)."""
    pruned = copy.deepcopy(model)
    adapter = adapter_for(pruned)
    cfg = pruned.config
    shapes = layer_shapes(model)
    widths = ([s["num_q_heads"] // s["num_kv_heads"] * int(a.kv_groups_kept) for s, a in zip(shapes, alloc.layers)],
              [int(a.kv_groups_kept) for a in alloc.layers], [int(a.mlp_kept) for a in alloc.layers])
    for key, values in zip(LAYER_WIDTH_KEYS, widths):
        setattr(cfg, key, values)
    setattr(cfg, OUTPUT_BIAS_KEY, output_bias)
    resize_decoder_layers(adapter.inner_model(pruned), cfg)
    embed = pruned.get_input_embeddings().weight
    embed_name = next(n for n, p in pruned.named_parameters() if p is embed)
    out = {}
    for name, tensor in pruned.state_dict(keep_vars=True).items():
        if tensor is embed and name != embed_name:
            continue
        out[name] = (tensor.dtype, tuple(tensor.shape))
    return out


def prune_sequential(
    checkpoint: SafetensorsCheckpoint | str | Path,
    tokenizer: Any,
    config: PruneConfig,
    sink: TensorSink,
    *,
    dtype: torch.dtype = torch.float32,
    calib_ids: torch.Tensor | None = None,
    calib_source: dict[str, Any] | None = None,
    refit_ids: torch.Tensor | None = None,
    layer_importance: LayerImportance | None = None,
    options: SequentialOptions | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune the checkpoint folder (or open ``checkpoint``) as ``config`` says, one decoder layer in memory at
    a time, writing the pruned tensors to ``sink``; ``dtype`` is the weights' dtype while pruning and in the
    output. The other arguments are :func:`layerprune.pruning.prune`'s. Returns the pruned skeleton, the
    allocation, the layer importance and the report (the in-memory report plus ``sequential``)."""
    config = resolve_config(config, "layers")  # the defaults filled and every field checked, once
    options = options or SequentialOptions()
    return_freed_memory_to_the_system()  # a freed layer leaves the resident set (pruning/executor.py)
    try:
        return _prune_sequential(checkpoint, tokenizer, config, sink, dtype, calib_ids, calib_source, refit_ids,
                                 layer_importance, options, progress)
    finally:
        return_freed_memory_to_the_system(GLIBC_MMAP_THRESHOLD_MAX)


def _prune_sequential(checkpoint, tokenizer, config, sink, dtype, calib_ids, calib_source, refit_ids, layer_importance,
                      options, progress) -> PruneResult:
    from layerprune.models import load_config

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInputError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    ckpt = checkpoint if isinstance(checkpoint, SafetensorsCheckpoint) else SafetensorsCheckpoint(checkpoint)
    total_start = time.perf_counter()
    try:
        model_config = load_config(ckpt.folder)
        adapter_for(model_config, "prune: model")  # an unsupported family is refused before any work
        ckpt.check_config(model_config)  # sane sizes, its layers and tensors all there, before a skeleton is built
        engine = _Engine(ckpt, model_config, config, sink, dtype, options, progress)
        model, adapter = engine.model, engine.adapter
        shapes = layer_shapes(model)
        validate_against_model(config, len(shapes), min(s["num_kv_heads"] for s in shapes))
        check_dense(model, shapes)
        check_feasible(model.config, config)
        seed_everything(config.seed)
        clock = engine.clock
        params_before = count_parameters(model)
        costs_before = per_token_costs(model, config.flops_seq_len)
        try:
            with clock("calibration"):
                if calib_ids is None:
                    calib_ids, calib_source = calibration_ids(tokenizer, config)
                calib_ids = checked_calibration(calib_ids, model.config)
                needs_refit_batch = config.refit != "none" or config.mode == "flap"  # FLAP scores on it
                if needs_refit_batch and refit_ids is None:
                    refit_ids = refit_batch(tokenizer, config)
                # the batches embedded (the rows of their tokens read), the embeddings copied to the output
                with torch.no_grad():
                    x0, kwargs = engine.capture_inputs(calib_ids)
                    calib_x0 = engine.pool.store(x0, copy=False)
                    refit_x0, refit_kwargs = None, None
                    if refit_ids is not None and needs_refit_batch:
                        r0, refit_kwargs = engine.capture_inputs(refit_ids.long())
                        refit_x0 = engine.pool.store(r0, copy=False)
                    del x0
                engine.copy_rows(engine._embed_name)
            labels = calib_ids.to(engine.device)

            li, dense_scores, importance_pass = None, None, False
            if config.mode == "flap":
                dense_scores = engine.fluctuation_pass(refit_x0, refit_kwargs)
            elif config.mode == "unbalanced":
                if config.layer_importance == "depth" and layer_importance is None:
                    li = depth_importance(model, mlp_step=config.mlp_step)  # no data: no importance pass
                elif layer_importance is not None:
                    if layer_importance.method != config.layer_importance:
                        raise InvalidInputError(f"layer_importance: given {layer_importance.method!r} results, the "
                                                f"config asks for {config.layer_importance!r}")
                    check_importance(layer_importance, config, shapes)
                    li = layer_importance
                else:
                    li, dense_scores = engine.importance_pass(calib_x0, kwargs, labels, refit_x0, refit_kwargs)
                    importance_pass = True

            with clock("allocation"):
                spec = spec_for_model(model, config, li)
                if config.mode == "flap":
                    alloc = flap_allocation(spec, [kv for kv, _ in dense_scores], [ch for _, ch in dense_scores],
                                            config.min_kv_groups)
                else:
                    alloc = allocate(spec, solver=solver_for(config))
                manifest = _manifest(model, alloc, config.refit in BIAS_MODES)
                with clock("write"):  # the shards are laid out, the staged embeddings copied in
                    sink.plan(manifest)
            kept_kv, kept_mlp, refit_report = engine.prune_pass(
                alloc, dense_scores, calib_x0, kwargs, refit_x0 if config.refit != "none" else None, refit_kwargs)
            for slot in (calib_x0, refit_x0):
                if slot is not None:
                    slot.free()
            if not importance_pass:
                engine.write_head()  # no importance pass read them
        finally:
            engine.pool.close()

        if config.refit in BIAS_MODES:
            setattr(model.config, OUTPUT_BIAS_KEY, True)
        new_shapes = layer_shapes(model)
        final_kv = [int(a.kv_groups_kept) for a in alloc.layers]
        final_mlp = [int(a.mlp_kept) for a in alloc.layers]
        if [s["num_kv_heads"] for s in new_shapes] != final_kv or [s["intermediate"] for s in new_shapes] != final_mlp:
            raise ModelError("pruned shapes do not match the allocation (internal inconsistency)")
        for key, values in zip(LAYER_WIDTH_KEYS, ([s["num_q_heads"] for s in new_shapes], final_kv, final_mlp)):
            setattr(model.config, key, values)
        params_after = count_parameters(model)
        if params_after["total"] != alloc.params_after:
            raise InternalError(
                f"pruned model has {params_after['total']:,} parameters, the allocation planned {alloc.params_after:,}")
        costs_after = per_token_costs(model, config.flops_seq_len)
        if (costs_after["kv_cache_bytes"], costs_after["flops"]) != (alloc.kv_cache_bytes_after, alloc.flops_after):
            raise InternalError(
                f"pruned model has {costs_after['kv_cache_bytes']:,} KV-cache bytes and {costs_after['flops']:,} FLOPs "
                f"per token, the allocation planned {alloc.kv_cache_bytes_after:,} and {alloc.flops_after:,}")
        timings = {key: clock.totals.get(key, 0.0) for key in
                   ("calibration", "element_scores", "layer_importance", "allocation", "pruning")}
        if refit_report is not None:
            timings["refit"] = clock.totals.get("refit", 0.0)
        timings["read"] = clock.totals.get("read", 0.0)
        timings["write"] = clock.totals.get("write", 0.0)
        timings["total"] = time.perf_counter() - total_start
        report = build_report(config, params_before, params_after, shapes, alloc, li, kept_kv, kept_mlp, calib_ids,
                              timings, family=adapter.name, calib_source=calib_source, executor="layers",
                              device=engine.device)
        report["refit"] = refit_report
        report.update(per_token_report(config, costs_before, costs_after))
        stats = engine.pool.stats
        report["sequential"] = {
            "passes": 2 if any(r["pass"] == "importance" for r in engine.records) else 1,
            "device": str(engine.device),
            "dtype": str(dtype).removeprefix("torch."),
            "checkpoint_bytes": ckpt.nbytes(),
            "bytes_read": ckpt.bytes_read,
            "max_layer_bytes": engine.max_layer_bytes,
            "hidden_states": {"ram_budget_bytes": engine.pool.ram_budget, "peak_ram_bytes": stats.peak_ram_bytes,
                              "peak_device_bytes": stats.peak_device_bytes, "spilled_bytes": stats.spilled_bytes,
                              "spilled_streams": stats.spilled_streams, "peak_spilled_bytes": stats.peak_spilled_bytes},
            "layers": engine.records,
        }
        return PruneResult(model=model, allocation=alloc, layer_importance=li, report=report)
    finally:
        if ckpt is not checkpoint:
            ckpt.close()


def layer_bytes(checkpoint: SafetensorsCheckpoint, model_config: Any, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of the largest decoder layer, bytes outside the layers) of a checkpoint at ``dtype``."""
    adapter = adapter_for(model_config, "config")
    prefixes = [adapter.layer_prefix(l) + "." for l in range(adapter.num_layers(model_config))]
    per_layer = [checkpoint.nbytes([n for n in checkpoint.names() if n.startswith(p)], dtype) for p in prefixes]
    return max(per_layer, default=0), checkpoint.nbytes(dtype=dtype) - sum(per_layer)


__all__ = ["SequentialOptions", "TensorSink", "layer_bytes", "prune_sequential"]
