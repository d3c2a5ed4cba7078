"""How much each decoder layer (and each of its two sub-blocks) matters.

Three methods, all measured on a calibration batch and all reusing ONE cached forward pass:

* ``removal`` -- the increase of the calibration loss (mean next-token cross-entropy; or of the
  perplexity, ``metric="ppl"``) when layer ``l`` is replaced by the identity (``combined``), when
  only its attention sub-block is skipped (``attn``) and when only its MLP sub-block is skipped
  (``mlp``).  The hidden states entering every layer are cached once; evaluating layer ``l``
  runs only layer ``l`` (partially) and layers ``l+1 .. L-1`` plus the final norm and lm_head.
* ``activation`` -- Block Influence (ShortGPT, Men et al. 2024): ``BI = 1 - mean_t cos(x_t, y_t)``
  between the hidden state entering and leaving a block, per token ``t``; for the whole layer,
  for the attention sub-block (``x -> x + Attn(LN1 x)``) and for the MLP sub-block
  (``h -> h + MLP(LN2 h)``).  One forward pass, no loss.
* ``sensitivity`` -- per-layer cost curves: the calibration-loss increase when ONLY layer ``l`` is
  pruned to ``g`` KV groups (attention curve) or to ``c`` MLP channels (MLP curve), the kept
  groups / channels being the best ones by the element scores (``pruning.select_keep``), i.e.
  exactly what the pruner will keep.  Pruning is simulated without copying the model: the
  removed query heads' ``o_proj`` input columns and the removed channels' ``down_proj`` input
  columns are zeroed by a forward pre-hook, which is exactly equivalent to deleting those heads /
  channels.  See :func:`sensitivity_importance` for the sampled points and the interpolation.

The Llama decoder layer is re-implemented here from its own submodules (pre-norm residual):
``h = x + self_attn(input_layernorm(x)); y = h + mlp(post_attention_layernorm(h))``, called with
the exact keyword arguments (position embeddings from ``model.model.rotary_emb``, causal mask)
that ``LlamaModel.forward`` passed to the layer, captured by a forward pre-hook.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layerprune.errors import InvalidInputError, ModelError, NumericalError

METHODS = ("removal", "activation", "sensitivity")
METRICS = ("loss", "ppl")
# Kept fractions sampled for the sensitivity curves (the endpoints "all kept" (=0 increase) and
# "none kept" (= sub-block removal) are added where they are needed).
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class LayerImportance:
    """Per-layer importance. Higher = more important (pruning it costs more).

    ``attn``/``mlp``/``combined`` have one entry per decoder layer. ``attn_curves[l][g]`` is the loss
    increase when layer ``l`` keeps ``g`` KV groups (g = 0..Hkv); ``mlp_curves[l][k]`` the increase
    when it keeps ``k * mlp_step`` MLP channels (k = 0..I/mlp_step, the allocation module's grid).
    """

    method: str
    attn: np.ndarray
    mlp: np.ndarray
    combined: np.ndarray
    attn_curves: list[np.ndarray] | None = None
    mlp_curves: list[np.ndarray] | None = None
    mlp_step: int = 1
    metric: str = "loss"
    base_loss: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(len(self.combined))

    def to_json(self) -> dict[str, Any]:
        def arr(a: np.ndarray) -> list[float]:
            return [float(v) for v in np.asarray(a, dtype=np.float64)]

        out: dict[str, Any] = {
            "method": self.method,
            "metric": self.metric,
            "base_loss": self.base_loss,
            "attn": arr(self.attn),
            "mlp": arr(self.mlp),
            "combined": arr(self.combined),
            "seconds": round(float(self.seconds), 3),
            "details": self.details,
        }
        if self.attn_curves is not None:
            out["attn_curves"] = [arr(c) for c in self.attn_curves]
        if self.mlp_curves is not None:
            out["mlp_step"] = self.mlp_step
            # The MLP grid can have ~I entries per layer; the report keeps the sampled points only.
            out["mlp_curve_samples"] = self.details.get("mlp_samples")
        return out


# ---------------------------------------------------------------------------------------------
# Cached forward pass and explicit decoder-layer evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerInputs:
    """Hidden states entering every decoder layer (``hidden[L]`` enters the final norm)."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[dict[str, Any]]
    labels: torch.Tensor
    base_loss: float


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """``model.model.layers`` of a Llama-like causal LM, checked for the sub-modules used here."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(model, "lm_head", None) is None or getattr(inner, "norm", None) is None:
        raise ModelError(f"model: {type(model).__name__} is not a Llama-like causal LM (needs model.model.layers, lm_head)")
    for i, layer in enumerate(layers):
        for sub in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, sub):
                raise ModelError(f"model: decoder layer {i} ({type(layer).__name__}) has no `{sub}`; not a Llama layer")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(layer.self_attn, proj):
                raise ModelError(f"model: layer {i} attention has no `{proj}`; not a Llama attention")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(layer.mlp, proj):
                raise ModelError(f"model: layer {i} MLP has no `{proj}`; not a Llama MLP")
    return layers


def _check_ids(calib_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype not in (torch.long, torch.int):
        raise InvalidInputError("calib_ids: expected a 2-D integer tensor [n_samples, seq_len]")
    if calib_ids.shape[1] < 2 or calib_ids.shape[0] < 1:
        raise InvalidInputError(f"calib_ids: need at least 1 sample of >= 2 tokens, got shape {tuple(calib_ids.shape)}")
    return calib_ids.long()


def head_loss(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4) -> float:
    """Mean next-token cross-entropy from the hidden state entering the final norm.

    ``loss = mean_{b,t<T-1} CE(lm_head(norm(h))[b,t], labels[b,t+1])`` (what HF's ``labels=input_ids``
    computes), evaluated ``chunk`` samples at a time to bound the logits' memory.
    """
    norm, lm_head = model.model.norm, model.lm_head
    total, count = 0.0, 0
    for s in range(0, hidden.shape[0], chunk):
        logits = lm_head(norm(hidden[s : s + chunk, :-1])).float()
        target = labels[s : s + chunk, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return total / count


def _layer_call(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def attention_block(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """``Attn(input_layernorm(x))`` (without the residual) with the layer's captured kwargs."""
    out = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden),
        attention_mask=kwargs.get("attention_mask"),
        position_embeddings=kwargs.get("position_embeddings"),
        position_ids=kwargs.get("position_ids"),
    )
    return out[0] if isinstance(out, tuple) else out


def mlp_block(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``MLP(post_attention_layernorm(h))`` (without the residual)."""
    return layer.mlp(layer.post_attention_layernorm(hidden))


def layer_forward(
    layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], *, skip_attn: bool = False, skip_mlp: bool = False
) -> torch.Tensor:
    """The Llama decoder layer written out: ``h = x + Attn(LN1 x)``; ``y = h + MLP(LN2 h)``, with
    either residual branch optionally skipped (the sub-block replaced by the identity)."""
    if not skip_attn:
        hidden = hidden + attention_block(layer, hidden, kwargs)
    if not skip_mlp:
        hidden = hidden + mlp_block(layer, hidden)
    return hidden


def capture_layer_inputs(model: torch.nn.Module, calib_ids: torch.Tensor, progress: bool = True) -> LayerInputs:
    """One forward pass that records the hidden state entering each decoder layer and the final
    norm, and the keyword arguments (mask, position embeddings) each layer was called with."""
    calib_ids = _check_ids(calib_ids)
    layers = decoder_layers(model)
    num = len(layers)
    hidden: list[torch.Tensor | None] = [None] * (num + 1)
    kwargs_seen: list[dict[str, Any]] = [{} for _ in range(num)]
    handles = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            hidden[index] = x.detach()
            kwargs_seen[index] = {
                k: v for k, v in kwargs.items() if k in ("attention_mask", "position_embeddings", "position_ids")
            }

        return hook

    def final_hook(module, args):
        hidden[num] = args[0].detach()

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
        handles.append(model.model.norm.register_forward_pre_hook(final_hook))
        with torch.no_grad():
            model.model(input_ids=calib_ids.to(_device(model)), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(h is None for h in hidden):
        raise ModelError("model: the forward pass did not go through every decoder layer")
    labels = calib_ids.to(_device(model))
    with torch.no_grad():
        base = head_loss(model, hidden[num], labels)  # type: ignore[arg-type]
    if not math.isfinite(base):
        raise NumericalError(f"calibration loss of the dense model is {base} (overflow in {_dtype(model)}?)")
    return LayerInputs(hidden=hidden, layer_kwargs=kwargs_seen, labels=labels, base_loss=base)  # type: ignore[arg-type]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def loss_from_layer(model: torch.nn.Module, cache: LayerInputs, start: int, hidden: torch.Tensor) -> float:
    """Calibration loss when ``hidden`` enters layer ``start`` (runs layers start..L-1 + head)."""
    layers = model.model.layers
    with torch.no_grad():
        for i in range(start, len(layers)):
            hidden = _layer_call(layers[i], hidden, cache.layer_kwargs[i])
        loss = head_loss(model, hidden, cache.labels)
    if not math.isfinite(loss):
        raise NumericalError(f"calibration loss became {loss} after perturbing layer {start - 1}")
    return loss


def subset_cache(model: torch.nn.Module, cache: LayerInputs, n_samples: int) -> LayerInputs:
    """The first ``n_samples`` calibration sequences of a cache (per-sample tensors sliced on dim 0)."""
    n_all = cache.labels.shape[0]
    if n_samples >= n_all:
        return cache

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n_all:
            return v[:n_samples]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    hidden = [h[:n_samples] for h in cache.hidden]
    kwargs = [{k: cut(v) for k, v in kw.items()} for kw in cache.layer_kwargs]
    labels = cache.labels[:n_samples]
    sub = LayerInputs(hidden=hidden, layer_kwargs=kwargs, labels=labels, base_loss=0.0)
    with torch.no_grad():
        sub.base_loss = head_loss(model, hidden[-1], labels)
    return sub


def _increase(loss: float, base: float, metric: str) -> float:
    if metric == "ppl":
        return math.exp(min(loss, 700.0)) - math.exp(base)
    return loss - base


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def removal_importance(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    *,
    metric: str = "loss",
    sub_blocks: bool = True,
    progress: bool = True,
    cache: LayerInputs | None = None,
) -> LayerImportance:
    """Loss (or perplexity) increase when layer ``l`` / its attention / its MLP is the identity.

    Cost: one cached forward + for every layer ``l`` (1 or 3 variants) x (layers l..L-1 + head).
    """
    if metric not in METRICS:
        raise InvalidInputError(f"metric: expected one of {METRICS}, got {metric!r}")
    start = time.perf_counter()
    cache = cache or capture_layer_inputs(model, calib_ids, progress)
    layers = model.model.layers
    num = len(layers)
    combined, attn, mlp = np.zeros(num), np.zeros(num), np.zeros(num)
    with torch.no_grad():
        for l in tqdm(range(num), desc="layer removal", disable=not progress, leave=False):
            x = cache.hidden[l]
            combined[l] = _increase(loss_from_layer(model, cache, l + 1, x), cache.base_loss, metric)
            if sub_blocks:
                kw = cache.layer_kwargs[l]
                no_attn = layer_forward(layers[l], x, kw, skip_attn=True)
                attn[l] = _increase(loss_from_layer(model, cache, l + 1, no_attn), cache.base_loss, metric)
                no_mlp = layer_forward(layers[l], x, kw, skip_mlp=True)
                mlp[l] = _increase(loss_from_layer(model, cache, l + 1, no_mlp), cache.base_loss, metric)
    if not sub_blocks:
        attn, mlp = combined.copy(), combined.copy()
    return LayerImportance(
        method="removal",
        attn=attn,
        mlp=mlp,
        combined=combined,
        metric=metric,
        base_loss=cache.base_loss,
        seconds=time.perf_counter() - start,
        details={"calib_tokens": int(cache.labels.numel()), "sub_blocks": sub_blocks},
    )


def _block_influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - mean_t cos(x_t, y_t)`` over all tokens (ShortGPT's Block Influence)."""
    cos = torch.nn.functional.cosine_similarity(x.float().reshape(-1, x.shape[-1]), y.float().reshape(-1, y.shape[-1]), dim=-1)
    return float(1.0 - cos.mean())


def activation_importance(
    model: torch.nn.Module, calib_ids: torch.Tensor, *, progress: bool = True, cache: LayerInputs | None = None
) -> LayerImportance:
    """Block Influence of every layer and sub-block from one forward pass (cached states)."""
    start = time.perf_counter()
    cache = cache or capture_layer_inputs(model, calib_ids, progress)
    layers = model.model.layers
    num = len(layers)
    combined, attn, mlp = np.zeros(num), np.zeros(num), np.zeros(num)
    with torch.no_grad():
        for l in tqdm(range(num), desc="block influence", disable=not progress, leave=False):
            x = cache.hidden[l]
            mid = x + attention_block(layers[l], x, cache.layer_kwargs[l])
            attn[l] = _block_influence(x, mid)
            mlp[l] = _block_influence(mid, cache.hidden[l + 1])
            combined[l] = _block_influence(x, cache.hidden[l + 1])
    for name, arr in (("attn", attn), ("mlp", mlp), ("combined", combined)):
        if not np.all(np.isfinite(arr)):
            raise NumericalError(f"block influence ({name}) is not finite")
    return LayerImportance(
        method="activation",
        attn=attn,
        mlp=mlp,
        combined=combined,
        metric="block_influence",
        base_loss=cache.base_loss,
        seconds=time.perf_counter() - start,
        details={"calib_tokens": int(cache.labels.numel())},
    )


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


def head_columns(kv_groups: Sequence[int], num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """o_proj input columns of the query heads served by ``kv_groups`` (KV head j serves query
    heads r*j .. r*j+r-1, r = num_heads // num_kv_heads)."""
    r = num_heads // num_kv_heads
    cols = [h * head_dim + d for j in sorted(kv_groups) for h in range(r * j, r * j + r) for d in range(head_dim)]
    return torch.tensor(cols, dtype=torch.long)


def attention_geometry(model: torch.nn.Module, layer_index: int) -> tuple[int, int, int]:
    """(num query heads, num KV heads, head_dim) of a layer, read from its weights (works after pruning)."""
    attn = model.model.layers[layer_index].self_attn
    head_dim = int(getattr(attn, "head_dim", model.config.hidden_size // model.config.num_attention_heads))
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim


def mlp_grid_size(intermediate: int, mlp_step: int) -> int:
    """Number of MLP grid points of the allocation module: index j keeps ``min(j * mlp_step, I)``
    channels, j = 0 .. ceil(I / mlp_step)."""
    return -(-intermediate // mlp_step) + 1


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
    kv_group_scores: Sequence[torch.Tensor],
    channel_scores: Sequence[torch.Tensor],
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
) -> LayerImportance:
    """Per-layer cost curves from a few pruned evaluations of one layer at a time.

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
    from layerprune.pruning import select_keep

    start = time.perf_counter()
    cache = cache or capture_layer_inputs(model, calib_ids, progress)
    if curve_samples is not None:
        if curve_samples < 1:
            raise InvalidInputError(f"curve_samples: must be >= 1, got {curve_samples}")
        cache = subset_cache(model, cache, curve_samples)
    layers = model.model.layers
    num = len(layers)
    if len(kv_group_scores) != num or len(channel_scores) != num:
        raise InvalidInputError(
            f"kv_group_scores/channel_scores: need one tensor per layer ({num}), got {len(kv_group_scores)}/{len(channel_scores)}"
        )
    attn_curves: list[np.ndarray] = []
    mlp_curves: list[np.ndarray] = []
    attn_samples: list[dict[int, float]] = []
    mlp_samples: list[dict[int, float]] = []
    evaluations = 0
    with torch.no_grad():
        for l in tqdm(range(num), desc="sensitivity curves", disable=not progress, leave=False):
            layer, x, kw = layers[l], cache.hidden[l], cache.layer_kwargs[l]
            num_heads, num_kv, head_dim = attention_geometry(model, l)
            inter = layer.mlp.down_proj.in_features
            if num_kv <= all_kv_points_up_to:
                g_points = list(range(max(min_kv_groups, 1), num_kv))
                if min_kv_groups == 0:
                    g_points = [0] + g_points
            else:
                g_points = _sample_points(num_kv, fractions, include_zero=min_kv_groups == 0)
            c_points = _sample_points(inter, fractions, include_zero=include_mlp_zero, step=mlp_step)
            g_values: dict[int, float] = {num_kv: 0.0}
            c_values: dict[int, float] = {inter: 0.0}
            # select_keep picks the top-scored groups / channels exactly as the pruner will.
            for g in g_points:
                kept_groups = select_keep([kv_group_scores[l]], [channel_scores[l]], [g], [inter])[0].kv_heads if g else ()
                cols = head_columns(kept_groups, num_heads, num_kv, head_dim).to(x.device)
                with _masked_inputs(layer.self_attn.o_proj, cols):
                    y = layer_forward(layer, x, kw)
                g_values[g] = _increase(loss_from_layer(model, cache, l + 1, y), cache.base_loss, metric)
                evaluations += 1
            for c in c_points:
                kept_channels = select_keep([kv_group_scores[l]], [channel_scores[l]], [num_kv], [c])[0].mlp_channels if c else ()
                cols = torch.tensor(list(kept_channels), dtype=torch.long, device=x.device)
                with _masked_inputs(layer.mlp.down_proj, cols):
                    y = layer_forward(layer, x, kw)
                c_values[c] = _increase(loss_from_layer(model, cache, l + 1, y), cache.base_loss, metric)
                evaluations += 1
            attn_grid = np.arange(num_kv + 1)
            attn_curves.append(_interp_curve(g_values, attn_grid))
            mlp_grid = np.arange(mlp_grid_size(inter, mlp_step)) * mlp_step
            mlp_curves.append(_interp_curve(c_values, np.minimum(mlp_grid, inter)))
            attn_samples.append(g_values)
            mlp_samples.append(c_values)
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
        base_loss=cache.base_loss,
        seconds=time.perf_counter() - start,
        details={
            "calib_tokens": int(cache.labels.numel()),
            "evaluations": evaluations,
            "attn_samples": [{str(k): v for k, v in sorted(s.items())} for s in attn_samples],
            "mlp_samples": [{str(k): v for k, v in sorted(s.items())} for s in mlp_samples],
            "interpolation": "linear between sampled points, monotone non-increasing in kept, clipped at 0",
        },
    )


def layer_importance(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    method: str = "removal",
    *,
    kv_group_scores: Sequence[torch.Tensor] | None = None,
    channel_scores: Sequence[torch.Tensor] | None = None,
    importance: str = "taylor",
    progress: bool = True,
    **options: Any,
) -> LayerImportance:
    """Dispatch to :func:`removal_importance`, :func:`activation_importance` or
    :func:`sensitivity_importance` (which computes element scores with ``importance`` when they
    are not given). The model is only read."""
    if method not in METHODS:
        raise InvalidInputError(f"layer_importance: expected one of {METHODS}, got {method!r}")
    calib_ids = _check_ids(calib_ids)
    decoder_layers(model)
    if method == "removal":
        return removal_importance(model, calib_ids, progress=progress, **options)
    if method == "activation":
        return activation_importance(model, calib_ids, progress=progress, **options)
    if kv_group_scores is None or channel_scores is None:
        from layerprune.group_scores import element_group_scores

        kv_group_scores, channel_scores = element_group_scores(model, calib_ids, importance=importance, progress=progress)
    return sensitivity_importance(model, calib_ids, kv_group_scores, channel_scores, progress=progress, **options)
