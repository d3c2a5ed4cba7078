"""`prune`: calibration -> element scores -> (layer importance) -> allocation -> structured pruning.

Modes:

* ``uniform`` -- LLM-Pruner ``llama3.py``: one rate in every layer of a range. Without
  ``match_params`` the ratio is the per-layer rate (``floor(rate*Hkv)`` KV groups and
  ``floor(rate*I)`` channels removed; the allocation module's ``layer_rate``), so the fraction of
  ALL parameters removed is lower and reported. With ``match_params`` the allocation's exact
  uniform solver removes ``ratio`` of all parameters (to one granule).
* ``unbalanced`` -- per-layer rates from layer importance (``removal`` / ``activation`` /
  ``sensitivity``) through a solver (``seed`` / ``greedy`` / ``lagrange`` / ``dp``).
  ``sensitivity`` gives the solver measured cost curves; the others give one importance per
  layer and component (the allocation's surrogate objective).

``homogeneous`` (with ``uniform`` + ``match_params`` or ``unbalanced``): the allocation's ``homogeneous``
solver keeps the same KV groups and MLP channels in every layer under the exact budget (to one step per
layer), so the pruned model saves under the family's own config (no remote code). In ``unbalanced`` mode
the equal widths are the best by the layer importance / sensitivity curves; in ``uniform`` mode they are the
ones closest to one rate for attention and MLP (the loss ``P_c (1 − k_c)²`` of each component's parameters).

Iterative pruning (``iterative_steps = N``): the allocation for the final ``ratio`` is computed once
on the dense model (layer importance too, on the dense model), and step ``k`` prunes every layer
to ``round(full - (full - final) * k / N)`` KV groups / channels, i.e. a linear schedule that
removes about ``ratio * k / N`` of the ORIGINAL parameters at step k (parameter counts are affine
in the kept counts); element scores are recomputed on the partially pruned model before every
step. Kept indices in the report always refer to the ORIGINAL model.

``prune`` never modifies its input model (it works on a deep copy), unless ``inplace=True`` (the CLI, which
loaded its own copy, prunes that one: no second model in memory).

Several processes (:mod:`layerprune.distributed`, e.g. under ``torchrun``): every rank passes the same model
and batches, computes on its share of the calibration samples, and every statistic is summed over the ranks;
rank 0's element scores and rank 0's allocation are broadcast, so every rank prunes to the same plan and
returns the same model. ``fsdp`` computes the gradient element scores on an FSDP2-sharded copy.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layerprune import distributed
from layerprune.allocation import AllocationSpec, allocate, spec_from_model_config
from layerprune.arch import OUTPUT_BIAS_KEY, adapter_for, gqa, layer_shapes, per_token_costs
from layerprune.arch.budget import mlp_grid_size
from layerprune.errors import InternalError, InvalidInputError, ModelError
from layerprune.importance import LayerImportance, depth_importance, reconstruction_importance, sensitivity_importance
from layerprune.importance import layer_importance as compute_layer_importance
from layerprune.models import count_parameters
from layerprune.provenance import command_line, versions
from layerprune.pruning.config import (
    PruneConfig,
    layer_ranges,
    method_name,
    resolve_config,
    solver_for,
    validate_against_model,
)
from layerprune.pruning.flap import flap_allocation, fluctuation_scores
from layerprune.pruning.refit_loop import refit_kept_weights
from layerprune.pruning.search import FitnessModel, SearchSettings, search_allocation, seed_refit
from layerprune.pruning.surgery import StructuredPruner
from layerprune.refit import BIAS_MODES, output_projection_grams
from layerprune.scoring.groups import element_group_scores
from layerprune.scoring.selection import LayerKeep, select_keep


@dataclass
class PruneResult:
    """What both executors return: the pruned model (layer by layer: the skeleton at the pruned widths, every
    tensor on the meta device, the weights in the output folder), the allocation, the layer importance and the
    report (``report.json``)."""

    model: torch.nn.Module
    allocation: Any
    layer_importance: LayerImportance | None
    report: dict[str, Any] = field(default_factory=dict)


def device_time(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done: CUDA runs asynchronously, and a clock read
    without waiting charges a stage's kernels to the stage after it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def seed_everything(seed: int) -> None:
    """torch, numpy and random seeded; deterministic algorithms where torch has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------


def _nonneg(values: np.ndarray) -> np.ndarray:
    """Importance for the allocation: finite and >= 0 (a negative removal cost is noise: 0)."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError("layer importance: contains NaN or infinite values")
    return np.maximum(arr, 0.0)


def build_allocation_spec(model_config: Any, config: PruneConfig, importance: LayerImportance | None, num_layers: int):
    """The allocation problem for ``config`` on a dense model described by ``model_config``."""
    ranges = layer_ranges(config, num_layers)
    constraints: dict[str, Any] = {
        "mlp_step": config.mlp_step,
        "min_kv_groups": config.min_kv_groups,
        "min_mlp": config.min_mlp_channels,
        "protected": tuple(int(p) for p in config.protected),
        "tie": config.tie,
        "attn_layer_start": ranges["attn"][0],
        "attn_layer_end": ranges["attn"][1],
        "mlp_layer_start": ranges["mlp"][0],
        "mlp_layer_end": ranges["mlp"][1],
        "min_effective_rate": config.min_effective_rate,
        "kv_cache_ratio": config.kv_cache_ratio,
        "flops_ratio": config.flops_ratio,
        "flops_seq_len": config.flops_seq_len,
    }
    if config.mode == "uniform" and not config.match_params:
        constraints["layer_rate"] = float(config.ratio)
    if importance is not None:
        if importance.attn_curves is not None and importance.mlp_curves is not None:
            constraints["attn_curves"] = [np.asarray(c, dtype=np.float64) for c in importance.attn_curves]
            constraints["mlp_curves"] = [np.asarray(c, dtype=np.float64) for c in importance.mlp_curves]
        constraints["attn_importance"] = _nonneg(importance.attn)
        constraints["mlp_importance"] = _nonneg(importance.mlp)
    spec = spec_from_model_config(model_config, float(config.ratio), **constraints)
    if config.mode == "uniform" and config.homogeneous and importance is None:
        # loss P_c (1 - k_c)^2 per component: the best equal widths remove attention and MLP at one rate
        # (the Lagrange condition 2 P_c r_c = mu P_c), as uniform does
        spec.attn_importance = np.array([float(s.params() - s.params(kv_groups=0)) for s in spec.layers])
        spec.mlp_importance = np.array([float(s.params() - s.params(mlp=0)) for s in spec.layers])
    if config.refit in BIAS_MODES:
        # The compensation biases are part of the pruned model: budgeted, and the ratio re-expressed so the
        # pruned model still has (1 - ratio) of the DENSE model's parameters, like every other method.
        dense_total = spec.params_total
        spec.layers = [adapter_for(model_config, "config").layer_shape(model_config, output_bias=True)] * len(spec.layers)
        added = spec.params_total - dense_total
        spec.ratio = (float(config.ratio) * dense_total + added) / spec.params_total
    return spec


def spec_for_model(model: torch.nn.Module, config: PruneConfig, importance: LayerImportance | None) -> AllocationSpec:
    """``build_allocation_spec`` for a loaded dense model, its parameter count checked against the model's.

    The adapter's formula must give exactly the model's decoder-layer parameters and its total (plus the
    compensation biases a bias refit adds); a difference is an internal error (a family term the formula
    misses), never a silently other budget.
    """
    adapter = adapter_for(model)
    spec = build_allocation_spec(model.config, config, importance, len(adapter.decoder_layers(model)))
    spec.kv_cache_dtype_bytes = next(model.parameters()).element_size()  # the cache holds the model's dtype
    counts = dict(count_parameters(model))
    if config.refit in BIAS_MODES:
        added = sum(adapter.layer_shape(model.config, output_bias=True).params()
                    - adapter.layer_shape(model.config).params() for _ in spec.layers)
        counts = {**counts, "decoder_layers": counts["decoder_layers"] + added, "total": counts["total"] + added}
    if spec.params_layers != counts["decoder_layers"] or spec.params_total != counts["total"]:
        raise InternalError(
            f"budget formula of {adapter_for(model).name}: decoder layers {spec.params_layers:,} / total "
            f"{spec.params_total:,} parameters, the model has {counts['decoder_layers']:,} / {counts['total']:,}"
        )
    return spec


def check_feasible(model_config: Any, config: PruneConfig) -> None:
    """Solve the allocation once with a flat importance (cheap: no data, no weights) so an
    impossible budget fails before any scoring. Raises InfeasibleError naming the binding constraint."""
    num_layers = adapter_for(model_config, "config").num_layers(model_config)
    flat = LayerImportance(
        method="flat", attn=np.ones(num_layers), mlp=np.ones(num_layers), combined=np.ones(num_layers)
    )
    allocate(build_allocation_spec(model_config, config, flat, num_layers), solver=solver_for(config))


def check_importance(li: LayerImportance, config: PruneConfig, shapes: Sequence[dict[str, int]]) -> None:
    if li.num_layers != len(shapes):
        raise InvalidInputError(f"layer_importance: has {li.num_layers} layers, the model has {len(shapes)}")
    if li.attn_curves is not None and li.mlp_curves is not None:
        if li.mlp_step != config.mlp_step:
            raise InvalidInputError(
                f"layer_importance: its MLP curves use mlp_step={li.mlp_step}, the config asks for {config.mlp_step}"
            )
        for l, s in enumerate(shapes):
            if len(li.attn_curves[l]) != s["num_kv_heads"] + 1 or len(li.mlp_curves[l]) != mlp_grid_size(
                s["intermediate"], config.mlp_step
            ):
                raise InvalidInputError(f"layer_importance: curve lengths of layer {l} do not match the model")


# ---------------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------------


def check_dense(model: torch.nn.Module, shapes: Sequence[dict[str, int]]) -> None:
    """The allocation is computed from the config: every layer must still have the config's widths."""
    cfg = model.config
    kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    want = (int(cfg.num_attention_heads), kv, int(cfg.intermediate_size))
    for l, s in enumerate(shapes):
        if (s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) != want:
            raise ModelError(
                f"model: layer {l} has {s['num_q_heads']} heads / {s['num_kv_heads']} KV heads / {s['intermediate']} "
                f"channels, its config says {want[0]} / {want[1]} / {want[2]}: prune the dense model"
            )


def refit_batch(tokenizer: Any, config: PruneConfig) -> torch.Tensor:
    """The refit's calibration windows: from the calibration text, with their own size and seed."""
    from layerprune.data import calibration_batch

    return calibration_batch(tokenizer, n_samples=config.refit_samples, seq_len=config.refit_seq_len,
                             seed=config.seed + 1, dataset=config.calib_dataset, data_dir=config.data_dir)


def _take_seed(work: torch.nn.Module, seeded: Any) -> tuple[dict[str, Any], list[LayerKeep]]:
    """``work`` becomes the seed's refit model (weights copied in place); its refit report and keep."""
    with torch.no_grad():
        work.load_state_dict(seeded.model.state_dict())
    return seeded.report, seeded.keep


def search_windows(tokenizer: Any, config: PruneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The allocation search's held-out windows, and as many more that check its final choice: the refit's draw
    continued past its ``refit_samples`` windows, so they come from rows of the calibration text the refit never
    read (and the check windows from rows the search never read)."""
    from layerprune.data import calibration_batch

    if distributed.active() is not None:
        raise InvalidInputError("allocation search: runs in one process; run it without torchrun")
    n, m = config.refit_samples, config.search_samples
    drawn = calibration_batch(tokenizer, n_samples=n + 2 * m, seq_len=config.refit_seq_len, seed=config.seed + 1,
                              dataset=config.calib_dataset, data_dir=config.data_dir)
    return drawn[n:n + m], drawn[n + m:]


def search_settings(config: PruneConfig) -> SearchSettings:
    """The search's settings from a prune config (its seed is the run's)."""
    return SearchSettings(generations=config.search_generations, time_limit=config.search_time,
                          offspring=config.search_offspring, samples=config.search_samples,
                          screen_samples=1, seed=config.seed)


def _refit_share(tokenizer: Any, config: PruneConfig) -> torch.Tensor:
    """This rank's share of the refit batch (all of it in one process)."""
    return distributed.local_samples(refit_batch(tokenizer, config), "refit_samples")


def _element_scores(model: torch.nn.Module, calib_ids: torch.Tensor, config: PruneConfig,
                    progress: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The element scores of the batch from this rank's share ``calib_ids``, rank 0's on every rank (the
    ranks then select the same heads and channels); on an FSDP2-sharded copy of ``model`` with ``fsdp``."""
    if config.fsdp:
        from layerprune.scoring.sharded import sharded_group_scores

        scores = sharded_group_scores(model, calib_ids, importance=config.importance, progress=progress)
    else:
        scores = element_group_scores(model, calib_ids, importance=config.importance, progress=progress)
    return distributed.broadcast_object(scores)


def measure_layer_importance(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    config: PruneConfig,
    element_scores: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    progress: bool = True,
    refit_ids: torch.Tensor | None = None,
) -> LayerImportance:
    """The layer importance ``config`` asks for, on ``model`` (only read) and ``calib_ids``: the one code path
    of ``prune`` and ``compare``. ``sensitivity`` needs the dense element scores (computed when not given);
    with a refit it measures each point after the refit, its statistics taken from ``refit_ids``."""
    if config.layer_importance == "sensitivity":
        if element_scores is None and config.importance != "obs":
            element_scores = element_group_scores(model, calib_ids, importance=config.importance, progress=progress)
        grams = None
        if config.refit != "none":
            if refit_ids is None:
                raise InvalidInputError("refit_ids: sensitivity curves after a refit need the refit's calibration batch")
            grams = output_projection_grams(model, refit_ids.long().to(calib_ids.device), progress=progress)
        return sensitivity_importance(
            model, calib_ids, *(element_scores if element_scores is not None else (None, None)), mlp_step=config.mlp_step,
            min_kv_groups=config.min_kv_groups, curve_samples=config.curve_samples, progress=progress,
            refit_grams=grams, refit=config.refit, refit_damping=config.refit_damping,
        )
    if config.layer_importance == "depth":
        return depth_importance(model, mlp_step=config.mlp_step)
    if config.layer_importance == "reconstruction":
        if refit_ids is None:
            raise InvalidInputError("refit_ids: reconstruction curves are measured on the refit's calibration batch")
        return reconstruction_importance(model, refit_ids.long().to(calib_ids.device), mlp_step=config.mlp_step,
                                         min_kv_groups=config.min_kv_groups, damping=config.refit_damping,
                                         fisher_samples=config.fisher_samples, curve_samples=config.curve_samples,
                                         progress=progress)
    options = {"metric": config.removal_metric} if config.layer_importance == "removal" else {}
    return compute_layer_importance(model, calib_ids, config.layer_importance, progress=progress, **options)


def step_targets(full: Sequence[int], final: Sequence[int], step: int, steps: int) -> list[int]:
    """Kept counts at ``step`` of ``steps`` on the linear schedule from ``full`` to ``final``."""
    return [int(f - math.floor((f - t) * step / steps + 0.5)) for f, t in zip(full, final)]


def checked_calibration(calib_ids: Any, model_config: Any) -> torch.Tensor:
    """``calib_ids`` as a long tensor, refused in one line unless it is [n_samples, seq_len >= 2] token ids of
    the model's vocabulary."""
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise InvalidInputError("calib_ids: expected a [n_samples, seq_len >= 2] tensor of token ids")
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    if vocab and (int(calib_ids.min()) < 0 or int(calib_ids.max()) >= vocab):
        raise InvalidInputError(f"calib_ids: token ids must be in [0, {vocab})")
    return calib_ids.long()


def calibration_ids(tokenizer: Any, config: PruneConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The calibration batch ``config`` asks for, and exactly which text it came from."""
    from layerprune.data import calibration_batch, calibration_source

    source = calibration_source(config.calib_dataset, config.data_dir)
    ids = calibration_batch(
        tokenizer, n_samples=config.calib_samples, seq_len=config.calib_seq_len, seed=config.seed,
        dataset=config.calib_dataset, data_dir=config.data_dir,
    )
    return ids, source


def prune(
    model: torch.nn.Module,
    tokenizer: Any,
    config: PruneConfig,
    *,
    layer_importance: LayerImportance | None = None,
    calib_ids: torch.Tensor | None = None,
    calib_source: dict[str, Any] | None = None,
    refit_ids: torch.Tensor | None = None,
    progress: bool = True,
    inplace: bool = False,
) -> PruneResult:
    """Prune a deep copy of ``model`` as ``config`` says; returns it with the allocation and a report.
    With ``inplace`` the model itself is pruned and returned (no copy: half the memory).

    ``layer_importance`` reuses an earlier computation (e.g. across methods of ``compare``);
    ``calib_ids`` ([n, seq_len] token ids) replaces the calibration batch drawn from ``config.calib_dataset``;
    ``calib_source`` then says where they came from (the report records it). ``refit_ids`` replaces the
    refit's own calibration batch (``config.refit_samples`` windows of ``config.refit_seq_len`` tokens).
    """
    config = resolve_config(config, "memory")  # the defaults filled and every field checked, once
    adapter_for(model, "prune: model")  # an unsupported family is refused before any work
    layers = adapter_for(model).decoder_layers(model)
    num_layers = len(layers)
    shapes = layer_shapes(model)
    validate_against_model(config, num_layers, min(s["num_kv_heads"] for s in shapes))
    check_dense(model, shapes)
    timings: dict[str, float] = {}
    device = next(model.parameters()).device  # every timing waits for the work queued there (CUDA is asynchronous)
    total_start = device_time(device)
    seed_everything(config.seed)

    t0 = device_time(device)
    if calib_ids is None:
        calib_ids, calib_source = calibration_ids(tokenizer, config)
    calib_ids = checked_calibration(calib_ids, model.config).to(next(model.parameters()).device)
    # Data-parallel (layerprune.distributed): every rank holds the whole batch and computes on its share.
    calib_all, calib_ids = calib_ids, distributed.local_samples(calib_ids, "calib_samples")
    if refit_ids is not None:
        refit_ids = distributed.local_samples(refit_ids, "refit_samples")
    timings["calibration"] = device_time(device) - t0

    work = model.eval() if inplace else copy.deepcopy(model).eval()
    params_before = count_parameters(work)
    costs_before = per_token_costs(work, config.flops_seq_len)  # before any surgery (inplace: on the input)
    check_feasible(model.config, config)

    # Dense element scores: needed by the sensitivity curves and by the first pruning step. FLAP scores by
    # its fluctuation metric on the refit batch (its statistics need more text than the curves).
    t0 = device_time(device)
    if config.mode == "flap":
        if refit_ids is None:
            refit_ids = _refit_share(tokenizer, config)
        dense_scores = distributed.broadcast_object(
            fluctuation_scores(work, refit_ids.long().to(calib_ids.device), progress=progress))
    elif config.importance == "obs":
        dense_scores = None  # chosen after the allocation, layer by layer, from the refit's Grams
    else:
        dense_scores = _element_scores(work, calib_ids, config, progress)
    timings["element_scores"] = device_time(device) - t0

    li = None
    t0 = device_time(device)
    if config.mode == "unbalanced":
        if layer_importance is not None:
            if layer_importance.method != config.layer_importance:
                raise InvalidInputError(
                    f"layer_importance: given {layer_importance.method!r} results, the config asks for {config.layer_importance!r}"
                )
            check_importance(layer_importance, config, shapes)
            li = layer_importance
        else:
            if config.refit != "none" and refit_ids is None:
                refit_ids = _refit_share(tokenizer, config)
            li = measure_layer_importance(work, calib_ids, config, dense_scores, progress=progress, refit_ids=refit_ids)
    timings["layer_importance"] = device_time(device) - t0

    t0 = device_time(device)
    spec = spec_for_model(work, config, li)
    if config.mode == "flap":
        alloc = distributed.on_rank0(flap_allocation, spec, dense_scores[0], dense_scores[1], config.min_kv_groups)
    else:
        alloc = distributed.on_rank0(allocate, spec, solver=solver_for(config))  # the same plan on every rank
    timings["allocation"] = device_time(device) - t0
    search = seeded = None
    if config.allocation == "search":
        t0 = device_time(device)
        if refit_ids is None:
            refit_ids = _refit_share(tokenizer, config)
        held_out, check_ids = search_windows(tokenizer, config)
        seeded = seed_refit(work, alloc, refit_ids.long().to(calib_ids.device), damping=config.refit_damping,
                            error_correction=config.refit_error_correction, progress=progress)
        search = search_allocation(work, spec, alloc, seeded.grams, held_out, search_settings(config),
                                   damping=config.refit_damping, progress=progress)
        seeded.grams = []
        # the final choice is checked on windows the search never scored on (its own are biased toward its answer)
        search.fitness_model = FitnessModel(work, None, check_ids, search_settings(config).top_k)
        search.checks["check_tokens"] = int(check_ids.shape[0] * (check_ids.shape[1] - 1))
        search.checks["seed_model_kl"] = search.fitness_model.score(seeded.model)
        seed_alloc, alloc = alloc, search.allocation
        timings["search"] = device_time(device) - t0

    full_kv = [s["num_kv_heads"] for s in shapes]
    full_mlp = [s["intermediate"] for s in shapes]
    final_kv = [int(a.kv_groups_kept) for a in alloc.layers]
    final_mlp = [int(a.mlp_kept) for a in alloc.layers]
    kept_kv = [list(range(n)) for n in full_kv]  # indices into the ORIGINAL model
    kept_mlp = [list(range(n)) for n in full_mlp]
    example = calib_ids[:1, : min(16, calib_ids.shape[1])]
    t0 = device_time(device)
    rescoring = 0.0
    refit_report: dict[str, Any] | None = None
    steps = config.iterative_steps
    for step in tqdm(range(1, steps + 1), desc="pruning steps", disable=not progress or steps == 1, leave=False):
        want_kv = step_targets(full_kv, final_kv, step, steps)
        want_mlp = step_targets(full_mlp, final_mlp, step, steps)
        if step == 1 or config.mode == "flap":
            kv_scores, ch_scores = dense_scores if dense_scores is not None else (None, None)
        else:
            r0 = device_time(device)
            kv_scores, ch_scores = _element_scores(work, calib_ids, config, progress)
            rescoring += device_time(device) - r0
        if kv_scores is None:  # obs: the counts only; refit_kept_weights chooses which
            keep = [LayerKeep(tuple(range(g)), tuple(range(f))) for g, f in zip(want_kv, want_mlp)]
        else:
            keep = select_keep(kv_scores, ch_scores, want_kv, want_mlp)
        if step == steps and config.refit != "none":
            r0 = device_time(device)
            if refit_ids is None:
                refit_ids = _refit_share(tokenizer, config)
            if seeded is not None and not search.changed:  # the seed's refit model is this one: no second refit
                refit_report, keep = _take_seed(work, seeded)
            else:
                refit_report, keep = refit_kept_weights(
                    work, keep, refit_ids.long().to(calib_ids.device), mode=config.refit, damping=config.refit_damping,
                    error_correction=config.refit_error_correction, progress=progress,
                    select="obs" if config.importance == "obs" else "given")
            if seeded is not None:
                search.checks["final_model_kl"] = search.fitness_model.score(work)
                search.checks["kept"] = "search"
                if search.checks["final_model_kl"] > search.checks["seed_model_kl"]:
                    # the searched widths' own refit model scores worse than the solver's: keep the solver's
                    refit_report, keep = _take_seed(work, seeded)
                    alloc = seed_alloc
                    final_kv = [int(a.kv_groups_kept) for a in alloc.layers]
                    final_mlp = [int(a.mlp_kept) for a in alloc.layers]
                    search.checks["kept"] = "solver"
                search.fitness_model = None
                seeded = None
            timings["refit"] = device_time(device) - r0
            rescoring += timings["refit"]  # kept apart from the surgery's time
        StructuredPruner(work, example).prune(keep)
        kept_kv = [[prev[i] for i in k.kv_heads] for prev, k in zip(kept_kv, keep)]
        kept_mlp = [[prev[i] for i in k.mlp_channels] for prev, k in zip(kept_mlp, keep)]
    timings["pruning"] = device_time(device) - t0 - rescoring
    if steps > 1:
        timings["element_scores"] += rescoring - timings.get("refit", 0.0)

    if config.refit in BIAS_MODES:
        setattr(work.config, OUTPUT_BIAS_KEY, True)
    new_shapes = layer_shapes(work)
    if [s["num_kv_heads"] for s in new_shapes] != final_kv or [s["intermediate"] for s in new_shapes] != final_mlp:
        raise ModelError("pruned shapes do not match the allocation (internal inconsistency)")
    params_after = count_parameters(work)
    if params_after["total"] != alloc.params_after:
        raise InternalError(
            f"pruned model has {params_after['total']:,} parameters, the allocation planned {alloc.params_after:,}"
        )
    costs_after = per_token_costs(work, config.flops_seq_len)
    if (costs_after["kv_cache_bytes"], costs_after["flops"]) != (alloc.kv_cache_bytes_after, alloc.flops_after):
        raise InternalError(
            f"pruned model has {costs_after['kv_cache_bytes']:,} KV-cache bytes and {costs_after['flops']:,} FLOPs per "
            f"token, the allocation planned {alloc.kv_cache_bytes_after:,} and {alloc.flops_after:,}"
        )
    timings["total"] = device_time(device) - total_start
    report = build_report(config, params_before, params_after, shapes, alloc, li, kept_kv, kept_mlp, calib_all, timings,
                          family=adapter_for(model).name, calib_source=calib_source, executor="memory",
                          device=next(work.parameters()).device)
    report["refit"] = refit_report
    report["search"] = None if search is None else search.to_json()
    report.update(per_token_report(config, costs_before, costs_after))
    return PruneResult(model=work, allocation=alloc, layer_importance=li, report=report)


def build_report(config, params_before, params_after, shapes, alloc, li, kept_kv, kept_mlp, calib_ids, timings,
                 family=None, calib_source=None, executor="memory", device="cpu"):
    """The JSON-ready record of one pruning run (report.json in the output folder)."""
    before, after = params_before["total"], params_after["total"]
    layers_before, layers_after = params_before["decoder_layers"], params_after["decoder_layers"]
    per_layer = []
    for l, s in enumerate(shapes):
        r = s["num_q_heads"] // s["num_kv_heads"]
        a = alloc.layers[l]
        entry = {
            "layer": l,
            "kv_heads_before": s["num_kv_heads"],
            "kv_heads_kept": kept_kv[l],
            "q_heads_kept": gqa.query_heads(kept_kv[l], r),
            "mlp_before": s["intermediate"],
            "mlp_kept": len(kept_mlp[l]),
            "mlp_channels_kept": kept_mlp[l],
            "attn_rate": 1.0 - len(kept_kv[l]) / s["num_kv_heads"],
            "mlp_rate": 1.0 - len(kept_mlp[l]) / s["intermediate"],
            "params_kept": int(getattr(a, "params_kept", 0)),
        }
        if li is not None:
            entry["importance"] = {"attn": float(li.attn[l]), "mlp": float(li.mlp[l]), "combined": float(li.combined[l])}
        per_layer.append(entry)
    alloc_json = alloc.to_json() if hasattr(alloc, "to_json") else None
    return {
        "command": command_line(),
        "versions": versions(),
        "run": distributed.run_environment(executor, device),
        "config": config.to_json(),
        "method": method_name(config),
        "target_ratio": float(config.ratio),
        "params_before": params_before,
        "params_after": params_after,
        "actual_ratio": 1.0 - after / before,
        "actual_ratio_layers": 1.0 - layers_after / layers_before,
        "family": family,
        "calibration": {"samples": int(calib_ids.shape[0]), "seq_len": int(calib_ids.shape[1]),
                        "source": calib_source if calib_source is not None else "token ids given to prune()"},
        "layers": per_layer,
        "allocation": alloc_json,
        "layer_importance": li.to_json() if li is not None else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def per_token_report(config: PruneConfig, before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """The KV-cache and FLOPs figures of a run (:func:`layerprune.arch.per_token_costs` of the dense and the
    pruned model): per token before and after, the removed fractions, and the bounds asked for."""
    def removed(key: str) -> float:
        return 1.0 - after[key] / before[key] if before[key] else 0.0

    return {
        "kv_cache_bytes_per_token": {"before": before["kv_cache_bytes"], "after": after["kv_cache_bytes"],
                                     "dtype_bytes": before["dtype_bytes"]},
        "flops_per_token": {"before": before["flops"], "after": after["flops"], "seq_len": before["seq_len"]},
        "actual_kv_cache_ratio": removed("kv_cache_bytes"),
        "actual_flops_ratio": removed("flops"),
        "target_kv_cache_ratio": config.kv_cache_ratio,
        "target_flops_ratio": config.flops_ratio,
    }


def summary_table(report: dict[str, Any], extra: Sequence[tuple[str, str]] = ()) -> str:
    """Plain-text summary printed at the end of `layerprune prune`."""
    b, a = report["params_before"], report["params_after"]
    rows = [
        ("method", report["method"]),
        ("params before", f"{b['total']:,}"),
        ("params after", f"{a['total']:,}"),
        ("target ratio", f"{report['target_ratio']:.4f}"),
        ("actual ratio (all params)", f"{report['actual_ratio']:.4f}"),
        ("actual ratio (decoder layers)", f"{report['actual_ratio_layers']:.4f}"),
    ]
    for key, label, target in (("actual_kv_cache_ratio", "actual KV-cache ratio", "target_kv_cache_ratio"),
                               ("actual_flops_ratio", "actual FLOPs ratio", "target_flops_ratio")):
        if key in report:
            wanted = report.get(target)
            seq = f" at {report['flops_per_token']['seq_len']} positions" if key == "actual_flops_ratio" else ""
            rows.append((label + seq, f"{report[key]:.4f}" + (f" (at least {wanted:.4f})" if wanted is not None else "")))
    rows += [(f"time: {k}", f"{v:.1f} s") for k, v in report["timings"].items()]
    rows += list(extra)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
