"""Per-layer cost curves: the calibration-loss increase when ONLY layer ``l`` is pruned.

The attention curve gives the increase when layer ``l`` keeps ``g`` KV groups, the MLP curve when it
keeps ``c`` channels; the kept groups / channels are the best ones by the element scores
(:func:`layerprune.scoring.selection.select_keep`), exactly what the pruner will keep. Pruning is
simulated without copying the model: the removed query heads' ``o_proj`` input columns and the removed
channels' ``down_proj`` input columns are zeroed by a forward pre-hook, which is exactly equivalent to
deleting them. See :func:`sensitivity_importance` for the sampled points and the interpolation.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from layerprune import distributed
from layerprune.arch import adapter_for, gqa
from layerprune.arch.budget import mlp_grid_size
from layerprune.errors import InvalidInputError
from layerprune.importance.losses import METRICS, increase, loss_from_layer, subset_cache
from layerprune.models.layer_calls import LayerInputs, capture_layer_inputs
from layerprune.importance.result import LayerImportance
from layerprune.refit import DEFAULT_DAMPING, InputGram, compensation_bias, refit_output_projection
from layerprune.refit.obs import DEFAULT_BATCH_FRACTION, structured_obs
from layerprune.scoring.selection import select_keep

# Kept fractions sampled for the curves (the endpoints "all kept" (= 0 increase) and "none kept"
# (= sub-block removal) are added where they are needed).
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)


@contextlib.contextmanager
def _masked_inputs(linear: torch.nn.Module, keep_columns: torch.Tensor) -> Iterator[None]:
    """Zero the input features of ``linear`` outside ``keep_columns`` (a forward pre-hook).

    Zeroing the inputs of ``o_proj`` (a removed query head's output) or ``down_proj`` (a removed
    channel) is exactly equivalent to deleting those columns: the weights are never touched.
    """
    mask = torch.zeros(linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    mask[keep_columns] = 1.0

    def hook(module, args):
        return (args[0] * mask,) + tuple(args[1:])

    handle = linear.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _refit_inputs(linear: torch.nn.Module, stats: InputGram, keep_columns: torch.Tensor, mode: str,
                  damping: float) -> Iterator[None]:
    """``linear`` as the pruner leaves it after the refit: its kept columns refit (``mode``), the others zero.
    The weights are put back on exit."""
    if keep_columns.numel() == 0:
        with _masked_inputs(linear, keep_columns):
            yield
        return
    weight, bias = linear.weight, linear.bias
    kept = keep_columns.tolist()
    if mode == "bias":
        new_w, new_b = weight[:, keep_columns], compensation_bias(weight, stats, kept, bias)
    else:
        new_w, new_b = refit_output_projection(weight, stats, kept, damping=damping, bias=bias,
                                               affine=mode == "lstsq-bias")
    full = torch.zeros_like(weight)
    full[:, keep_columns] = new_w
    saved_weight, saved_bias = weight.data, None if bias is None else bias.data
    linear.weight.data = full
    if new_b is not None and bias is None:
        linear.bias = torch.nn.Parameter(new_b, requires_grad=False)
    elif new_b is not None:
        linear.bias.data = new_b
    try:
        yield
    finally:
        linear.weight.data = saved_weight
        if bias is None:
            linear.bias = None
        else:
            linear.bias.data = saved_bias


@contextlib.contextmanager
def _replaced_weight(linear: torch.nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """``linear`` with ``weight`` (e.g. the structured-OBS weights, removed columns zero); put back on exit."""
    saved = linear.weight.data
    linear.weight.data = weight.to(saved)
    try:
        yield
    finally:
        linear.weight.data = saved


def head_columns(kv_groups: Sequence[int], num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj input columns of the query heads served by ``kv_groups`` (the GQA index map, :mod:`layerprune.arch.gqa`)."""
    ratio = gqa.group_ratio(num_heads, num_kv_heads)
    return torch.tensor(gqa.q_rows(sorted(kv_groups), ratio, head_dim), dtype=torch.long)


def _interp_curve(points: dict[int, float], grid: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation through the sampled (kept -> increase) points, then made
    monotone non-increasing in ``kept`` (keeping more never costs more: ``c[k] = max_{k'>=k} c[k']``)
    and clipped at 0 (calibration noise can make light pruning look beneficial)."""
    xs = np.array(sorted(points), dtype=np.float64)
    ys = np.array([points[int(x)] for x in xs], dtype=np.float64)
    curve = np.interp(grid.astype(np.float64), xs, ys)
    curve = np.maximum.accumulate(curve[::-1])[::-1]
    return np.maximum(curve, 0.0)


def _sample_points(total: int, fractions: Sequence[float], include_zero: bool, step: int = 1) -> list[int]:
    pts = {int(math.floor(total * f / step + 0.5)) * step for f in fractions}  # nearest, halves up
    pts = {p for p in pts if 0 < p < total}
    if include_zero:
        pts.add(0)
    return sorted(pts)


def sensitivity_importance(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    kv_group_scores: Sequence[torch.Tensor] | None,
    channel_scores: Sequence[torch.Tensor] | None,
    *,
    mlp_step: int = 1,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    all_kv_points_up_to: int = 4,
    min_kv_groups: int = 1,
    include_mlp_zero: bool = True,
    curve_samples: int | None = None,
    metric: str = "loss",
    progress: bool = True,
    cache: LayerInputs | None = None,
    refit_grams: Sequence[dict[str, InputGram]] | None = None,
    refit: str = "lstsq",
    refit_damping: float = DEFAULT_DAMPING,
) -> LayerImportance:
    """Per-layer cost curves from a few pruned evaluations of one layer at a time.

    ``refit_grams`` (per layer, :func:`layerprune.refit.output_projection_grams` of a separate refit batch):
    each sampled point is measured with the layer's kept o_proj / down_proj columns refit (``refit`` mode),
    as the pruner will leave them, so the allocation sees what a layer costs after the refit.

    Without element scores (``kv_group_scores`` and ``channel_scores`` None) every point keeps what structured OBS
    on ``refit_grams`` keeps (:func:`layerprune.refit.obs.structured_obs`, refit ``lstsq``), as ``--importance obs``
    prunes.

    ``curve_samples``: measure the curves on the first n calibration sequences only (default: all).

    Sampled points (loss increase when only layer ``l`` is pruned, everything else dense):

    * attention: every ``g`` in ``[g0, Hkv-1]`` when ``Hkv <= all_kv_points_up_to`` (SmolLM2:
      Hkv = 3 -> g = 1, 2), otherwise ``g = round(Hkv * f)`` for ``f`` in ``fractions``; plus
      ``g = 0`` (attention removed) only when ``min_kv_groups == 0`` (``g0``). ``g = Hkv`` is 0.
    * MLP: ``round(I * f / mlp_step) * mlp_step`` kept channels for ``f`` in ``fractions`` and 0 kept
      (MLP removed) when ``include_mlp_zero``; ``I`` kept is 0.

    Curves are linear interpolations of these points onto the allocation grid (attention
    g = 0..Hkv, MLP kept = 0, mlp_step, ..., I), made monotone and >= 0 (:func:`_interp_curve`);
    when ``g = 0`` is not sampled, ``curve[0]`` repeats ``curve[1]`` (allowed for no plan with
    ``min_kv_groups >= 1``). Not made convex: the ``dp`` solver takes any curve.

    ``attn[l]``/``mlp[l]`` summarise the curves as the increase at the middle sampled fraction;
    ``combined`` is their sum.  Cost: per layer (#attn points + #MLP points) partial evaluations,
    each running layers l..L-1 + head on the cached input of layer l.
    """
    if metric not in METRICS:
        raise InvalidInputError(f"metric: expected one of {METRICS}, got {metric!r}")
    if mlp_step < 1:
        raise InvalidInputError(f"mlp_step: must be >= 1, got {mlp_step}")
    start = time.perf_counter()
    cache = cache or capture_layer_inputs(model, calib_ids, progress)
    if curve_samples is not None:
        if curve_samples < 1:
            raise InvalidInputError(f"curve_samples: must be >= 1, got {curve_samples}")
        cache = subset_cache(model, cache, curve_samples)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    num = len(layers)
    if kv_group_scores is None or channel_scores is None:
        if refit_grams is None or refit != "lstsq" or (kv_group_scores, channel_scores) != (None, None):
            raise InvalidInputError("sensitivity: without element scores the points are chosen by OBS, which needs "
                                    "refit_grams and refit lstsq")
        kv_group_scores = channel_scores = [None] * num
    if len(kv_group_scores) != num or len(channel_scores) != num:
        raise InvalidInputError(
            f"kv_group_scores/channel_scores: need one tensor per layer ({num}), got {len(kv_group_scores)}/{len(channel_scores)}"
        )
    if refit_grams is not None and len(refit_grams) != num:
        raise InvalidInputError(f"refit_grams: need one entry per layer ({num}), got {len(refit_grams)}")

    attn_samples: list[dict[int, float]] = []
    mlp_samples: list[dict[int, float]] = []
    geometries = []
    with torch.no_grad():
        for l in tqdm(range(num), desc="sensitivity curves", disable=not progress, leave=False):
            layer, x, kw = layers[l], cache.hidden[l], cache.layer_kwargs[l]
            geometry = adapter.geometry(model, layer)
            g_points, c_points = curve_points(geometry, mlp_step=mlp_step, fractions=fractions,
                                              all_kv_points_up_to=all_kv_points_up_to, min_kv_groups=min_kv_groups,
                                              include_mlp_zero=include_mlp_zero)
            values: dict[str, dict[int, float]] = {"attn": {geometry.num_kv_heads: 0.0},
                                                   "mlp": {geometry.intermediate: 0.0}}
            for part, kept, y in pruned_layer_outputs(
                    adapter, layer, geometry, x, kw, kv_group_scores[l], channel_scores[l], g_points, c_points,
                    grams=None if refit_grams is None else refit_grams[l], refit=refit, refit_damping=refit_damping):
                values[part][kept] = increase(loss_from_layer(model, cache, l + 1, y), cache.base_loss, metric)
            geometries.append(geometry)
            attn_samples.append(values["attn"])
            mlp_samples.append(values["mlp"])
    refit_details = None if refit_grams is None else {
        "mode": refit, "damping": refit_damping, "tokens": int(refit_grams[0]["o_proj"].count) if refit_grams else 0}
    return sensitivity_result(geometries, attn_samples, mlp_samples, mlp_step=mlp_step, metric=metric,
                              base_loss=cache.base_loss, seconds=time.perf_counter() - start,
                              calib_tokens=distributed.global_count(cache.labels.numel()),
                              refit_details=refit_details)


def curve_points(geometry, *, mlp_step: int = 1, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 all_kv_points_up_to: int = 4, min_kv_groups: int = 1,
                 include_mlp_zero: bool = True) -> tuple[list[int], list[int]]:
    """The kept KV groups and kept MLP channels at which a layer of ``geometry`` is measured
    (the sampled points of :func:`sensitivity_importance`)."""
    num_kv, inter = geometry.num_kv_heads, geometry.intermediate
    if num_kv <= all_kv_points_up_to:
        g_points = list(range(max(min_kv_groups, 1), num_kv))
        if min_kv_groups == 0:
            g_points = [0] + g_points
    else:
        g_points = _sample_points(num_kv, fractions, include_zero=min_kv_groups == 0)
    c_points = _sample_points(inter, fractions, include_zero=include_mlp_zero, step=mlp_step)
    return g_points, c_points


def pruned_layer_outputs(adapter, layer, geometry, x, kw, kv_scores, channel_scores, g_points, c_points, *,
                         grams: dict[str, InputGram] | None = None, refit: str = "lstsq",
                         refit_damping: float = DEFAULT_DAMPING) -> Iterator[tuple[str, int, torch.Tensor]]:
    """``("attn", g, y)`` for every ``g`` in ``g_points`` and ``("mlp", c, y)`` for every ``c`` in ``c_points``:
    the output ``y`` of ``layer`` on ``x`` keeping only its ``g`` best KV groups (or ``c`` best channels) by
    the element scores, chosen by :func:`select_keep` as the pruner will; with ``grams`` (the layer's
    ``{"o_proj", "down_proj"}`` input Grams) the kept columns refit (``refit`` mode) first. Scores None: the kept
    ones and their weights are structured OBS's on ``grams`` (one nested removal order per projection)."""
    num_heads, num_kv, head_dim, inter = (geometry.num_q_heads, geometry.num_kv_heads, geometry.head_dim,
                                          geometry.intermediate)
    if kv_scores is None:
        yield from _obs_layer_outputs(adapter, layer, geometry, x, kw, g_points, c_points, grams, refit_damping)
        return

    def _remove(linear: torch.nn.Module, name: str, cols: torch.Tensor):
        if grams is None:
            return _masked_inputs(linear, cols)
        return _refit_inputs(linear, grams[name], cols, refit, refit_damping)

    for g in g_points:
        kept_groups = select_keep([kv_scores], [channel_scores], [g], [inter])[0].kv_heads if g else ()
        cols = head_columns(kept_groups, num_heads, num_kv, head_dim).to(x.device)
        with _remove(layer.self_attn.o_proj, "o_proj", cols):
            y = adapter.layer_forward(layer, x, kw)
        yield "attn", g, y
    for c in c_points:
        kept_channels = select_keep([kv_scores], [channel_scores], [num_kv], [c])[0].mlp_channels if c else ()
        cols = torch.tensor(list(kept_channels), dtype=torch.long, device=x.device)
        with _remove(layer.mlp.down_proj, "down_proj", cols):
            y = adapter.layer_forward(layer, x, kw)
        yield "mlp", c, y


def _obs_layer_outputs(adapter, layer, geometry, x, kw, g_points, c_points, grams, damping):
    """:func:`pruned_layer_outputs` with the kept groups and weights of structured OBS."""
    o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
    head_groups = [gqa.q_rows([j], geometry.ratio, geometry.head_dim) for j in range(geometry.num_kv_heads)]
    stages = structured_obs(o_proj.weight, grams["o_proj"], head_groups,
                            [geometry.num_kv_heads - g for g in g_points], damping=damping)
    for g, stage in zip(sorted(g_points, reverse=True), stages):
        with _replaced_weight(o_proj, stage.weight):
            yield "attn", g, adapter.layer_forward(layer, x, kw)
    stages = structured_obs(down_proj.weight, grams["down_proj"], [[c] for c in range(geometry.intermediate)],
                            [geometry.intermediate - c for c in c_points], damping=damping,
                            batch_fraction=DEFAULT_BATCH_FRACTION)
    for c, stage in zip(sorted(c_points, reverse=True), stages):
        with _replaced_weight(down_proj, stage.weight):
            yield "mlp", c, adapter.layer_forward(layer, x, kw)


def sensitivity_result(geometries, attn_samples: Sequence[dict[int, float]], mlp_samples: Sequence[dict[int, float]],
                       *, mlp_step: int, metric: str, base_loss: float, seconds: float, calib_tokens: int,
                       refit_details: dict | None = None) -> LayerImportance:
    """The curves through every layer's sampled ``{kept: loss increase}`` points (``kept = all`` at 0), as a
    :class:`LayerImportance` (see :func:`sensitivity_importance`)."""
    attn_curves: list[np.ndarray] = []
    mlp_curves: list[np.ndarray] = []
    for geometry, g_values, c_values in zip(geometries, attn_samples, mlp_samples):
        attn_grid = np.arange(geometry.num_kv_heads + 1)
        attn_curves.append(_interp_curve(g_values, attn_grid))
        mlp_grid = np.arange(mlp_grid_size(geometry.intermediate, mlp_step)) * mlp_step
        mlp_curves.append(_interp_curve(c_values, np.minimum(mlp_grid, geometry.intermediate)))
    evaluations = sum(len(v) - 1 for v in attn_samples) + sum(len(v) - 1 for v in mlp_samples)
    attn = np.array([float(c[c.size // 2]) for c in attn_curves])
    mlp = np.array([float(c[c.size // 2]) for c in mlp_curves])
    return LayerImportance(
        method="sensitivity",
        attn=attn,
        mlp=mlp,
        combined=attn + mlp,
        attn_curves=attn_curves,
        mlp_curves=mlp_curves,
        mlp_step=mlp_step,
        metric=metric,
        base_loss=base_loss,
        seconds=seconds,
        details={
            "calib_tokens": int(calib_tokens),
            "evaluations": evaluations,
            "attn_samples": [{str(k): v for k, v in sorted(s.items())} for s in attn_samples],
            "mlp_samples": [{str(k): v for k, v in sorted(s.items())} for s in mlp_samples],
            "interpolation": "linear between sampled points, monotone non-increasing in kept, clipped at 0",
            "refit": refit_details,
        },
    )


__all__ = ["DEFAULT_FRACTIONS", "curve_points", "head_columns", "pruned_layer_outputs", "sensitivity_importance",
           "sensitivity_result"]
