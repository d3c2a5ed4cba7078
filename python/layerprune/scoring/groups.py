"""Element scores folded into the two structures layerprune removes: KV groups and MLP channels.

Per decoder layer (GQA ratio r = H / Hkv, head size d), following LLM-Pruner's group "sum"
aggregation (every coupled weight's score of the structure is added):

* KV group j  = sum of the q_proj row scores of its query heads r*j .. r*j+r-1
              + k_proj rows of KV head j + v_proj rows of KV head j
              + o_proj COLUMN scores of query heads r*j .. r*j+r-1
  (a "head" is its d consecutive rows / columns);
* channel c   = gate_proj row c + up_proj row c + down_proj column c.

Element scores (``importance``):

* ``taylor`` / ``vectorize`` -- ONE forward + backward of the mean next-token loss over the whole
  calibration batch (LLM-Pruner ``param_first`` / ``vectorize``), scored by
  :class:`layerprune.scoring.GradientScorer` as gradients arrive (|W*G| summed per row / column;
  ``vectorize`` takes |sum W*G| per row / column).
* ``taylor2`` / ``taylor-mix`` -- one backward PER SAMPLE (LLM-Pruner ``param_second`` /
  ``param_mix``): Fisher diagonal H = mean_s g_s^2, G = mean_s g_s.
* ``l1`` / ``l2`` -- |W| / W^2 summed per row / column; no data.
* ``activation`` -- structured Wanda (Sun et al. 2023): with ||X_j|| = sqrt(sum over all
  calibration tokens of x_j^2) the L2 norm of input feature j of that projection
  (:class:`layerprune.scoring.ActivationStats` ``l2``), a ROW i of q/k/v/gate/up scores
  sum_j |W_ij| * ||X_j|| and a COLUMN c of o_proj/down scores ||X_c|| * sum_i |W_ic|
  (:func:`layerprune.scoring.wanda_channel_scores`). One forward pass, no gradients.

Biases (Qwen2's q/k/v) are not scored; they are removed with their rows. The model is never modified: requires_grad flags are
restored and every gradient is dropped.

Inside :func:`layerprune.distributed.data_parallel`, ``calib_ids`` are this rank's samples and the scores are
those of the whole batch: each rank's mean loss is weighted by its share of the tokens, so the gradients summed
over the ranks are the gradient of the mean over every token; activation sums and counts are summed; a
non-finite loss on one rank stops every rank. A model sharded with FSDP2 (:mod:`layerprune.scoring.sharded`)
is scored the same way over its mesh, from each rank's gradient shard.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from layerprune import distributed
from layerprune.arch import adapter_for, gqa
from layerprune.errors import InvalidInputError, NumericalError

IMPORTANCE_KINDS = ("taylor", "vectorize", "taylor2", "taylor-mix", "l1", "l2", "activation")
GRADIENT_KINDS = ("taylor", "vectorize", "taylor2", "taylor-mix")
PER_SAMPLE_KINDS = ("taylor2", "taylor-mix")


def fold_attention_scores(
    q_rows: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    o_cols: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """KV-group scores [Hkv] from per-row (q/k/v) and per-column (o) scores (GQA fold above)."""
    r = gqa.group_ratio(num_heads, num_kv_heads)
    for name, t, n in (("q_rows", q_rows, num_heads), ("k_rows", k_rows, num_kv_heads),
                       ("v_rows", v_rows, num_kv_heads), ("o_cols", o_cols, num_heads)):
        if t.numel() != n * head_dim:
            raise InvalidInputError(f"{name}: expected {n * head_dim} scores ({n} heads x {head_dim}), got {t.numel()}")
    q_head = q_rows.float().reshape(num_heads, head_dim).sum(1)
    o_head = o_cols.float().reshape(num_heads, head_dim).sum(1)
    group_of = torch.tensor(gqa.kv_group_of_query_head(num_heads, r), device=q_head.device)
    per_group_q = torch.zeros(num_kv_heads, device=q_head.device).index_add_(0, group_of, q_head + o_head)
    k_head = k_rows.float().reshape(num_kv_heads, head_dim).sum(1)
    v_head = v_rows.float().reshape(num_kv_heads, head_dim).sum(1)
    return per_group_q + k_head + v_head


def fold_mlp_scores(gate_rows: torch.Tensor, up_rows: torch.Tensor, down_cols: torch.Tensor) -> torch.Tensor:
    """Channel scores [I]: gate row c + up row c + down column c."""
    if not (gate_rows.numel() == up_rows.numel() == down_cols.numel()):
        raise InvalidInputError(
            f"MLP scores disagree in length: gate {gate_rows.numel()}, up {up_rows.numel()}, down {down_cols.numel()}"
        )
    return gate_rows.float() + up_rows.float() + down_cols.float()


def _check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(
            f"{what}: non-finite importance scores (NaN/inf weights or gradients; in float16 / bfloat16 an "
            "overflow: load the model in float32)"
        )
    return t


@contextlib.contextmanager
def _grad_only_on_decoder_linears(model: torch.nn.Module) -> Iterator[None]:
    """Gradients only for the decoder Linear weights; every flag and .grad restored afterwards."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    adapter = adapter_for(model)
    inside = {id(lin.weight) for layer in adapter.decoder_layers(model) for lin in adapter.projections(layer).values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in inside)
            p.grad = None
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def _first_non_finite_module(model: torch.nn.Module, ids: torch.Tensor) -> str:
    """Name of the first decoder sub-module whose output is NaN/inf on ``ids`` (a diagnostic pass)."""
    found: list[str] = []
    handles = []
    inside = {id(m) for layer in adapter_for(model).decoder_layers(model) for m in layer.modules()}
    for name, module in model.named_modules():
        if id(module) in inside and isinstance(module, torch.nn.Linear):

            def hook(mod, args, out, name=name):
                if not found and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
                    found.append(name)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "the final norm / lm_head"


def _non_finite_loss(model: torch.nn.Module, ids: torch.Tensor, loss: torch.Tensor) -> NumericalError:
    """The error of a non-finite calibration loss, naming the first module whose output is not finite."""
    dtype = next(model.parameters()).dtype
    hint = f"overflow in {dtype}? load the model in float32" if dtype != torch.float32 else "NaN/inf weights?"
    if _shard_group(model) is not None:
        where = "a layer of the sharded model (score it unsharded to locate it)"  # a lone forward would hang FSDP
    else:
        where = _first_non_finite_module(model, ids)
    on_rank = f" on rank {distributed.rank()}" if distributed.active() is not None else ""
    return NumericalError(f"calibration loss is {float(loss.detach())}{on_rank}: first non-finite output in {where} ({hint})")


def _agree_finite(model: torch.nn.Module, ids: torch.Tensor, loss: torch.Tensor | None) -> None:
    """Every rank learns whether some rank's loss is not finite (``loss`` None: this rank stopped on one); the
    ranks that saw it raise, the others wait for their error line. In one process: raise if not finite."""
    finite = loss is not None and bool(torch.isfinite(loss.detach()))
    bad = distributed.ranks_where(not finite)
    if not bad:
        return
    if finite:
        distributed.wait_for_failure(NumericalError(f"calibration loss is not finite on rank(s) {bad}"))
    if loss is not None:
        raise _non_finite_loss(model, ids, loss)


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor, agree: bool = True) -> torch.Tensor:
    """Mean next-token loss of ``ids``; a non-finite loss raises (on every rank when ``agree``; without it
    the caller agrees later, e.g. after a loop whose length differs between ranks)."""
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    if agree:
        _agree_finite(model, ids, loss)
    elif not bool(torch.isfinite(loss.detach())) and distributed.active() is None:
        raise _non_finite_loss(model, ids, loss)
    return loss


def _shard_group(model: torch.nn.Module):
    """The process group the model's decoder weights are sharded over (FSDP2), or None."""
    from layerprune.scoring.hooks import row_shard_group

    for layer in adapter_for(model).decoder_layers(model):
        for name, linear in adapter_for(model).projections(layer).items():
            group = row_shard_group(name, linear.weight)
            if group is not None:
                return group
    return None


def _gradient_scores(model, calib_ids, importance, progress):
    group = _shard_group(model)
    # the ranks of an FSDP model share the samples
    shared = distributed.data_parallel(group) if group is not None and distributed.active() is None \
        else contextlib.nullcontext()
    with shared:
        return _scored_backward(model, calib_ids, importance, progress, group)


def _scored_backward(model, calib_ids, importance, progress, group):
    from layerprune.scoring.hooks import GradientScorer

    per_sample = importance in PER_SAMPLE_KINDS
    with _grad_only_on_decoder_linears(model), GradientScorer(
        model, kinds=(importance,), free_grads=True, mode="per_sample" if per_sample else "batch"
    ) as scorer:
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                if per_sample:
                    stopped = None  # the sample whose loss is not finite; ranks hold different counts: agree after
                    for s in tqdm(range(calib_ids.shape[0]), desc=f"{importance} (per-sample backward)",
                                  disable=not progress, leave=False):
                        loss = _lm_loss(model, calib_ids[s : s + 1], agree=False)
                        if not bool(torch.isfinite(loss.detach())):
                            stopped = (calib_ids[s : s + 1], loss)
                            break
                        loss.backward()
                        scorer.step()
                    if distributed.active() is not None:
                        _agree_finite(model, *(stopped or (calib_ids, torch.zeros(()))))
                else:
                    # each rank's mean weighted by its token share: the summed gradients are the batch mean's
                    # (FSDP averages its reduce-scatter over the ranks: the world size undoes it)
                    share = distributed.token_share(calib_ids.shape[0] * (calib_ids.shape[1] - 1))
                    if group is not None:
                        import torch.distributed as dist

                        share *= dist.get_world_size(group)
                    loss = _lm_loss(model, calib_ids)
                    (loss * share if share != 1.0 else loss).backward()
                    scorer.step()
        finally:
            model.train(was_training)

        def rows(name):
            return scorer.row_scores(name, importance)

        def cols(name):
            return scorer.col_scores(name, importance)

        return _fold_all(model, rows, cols, importance, progress)


def _activation_scores(model, calib_ids, progress):
    from layerprune.scoring.dispatch import ActivationStats, wanda_channel_scores

    stats: dict[str, ActivationStats] = {}
    modules: dict[str, torch.nn.Linear] = {}
    handles = []
    adapter = adapter_for(model)
    for l, layer in enumerate(adapter.decoder_layers(model)):
        for sub_name, linear in adapter.projections(layer).items():
            key = f"{adapter.layer_prefix(l)}.{sub_name}"
            modules[key] = linear
            stats[key] = ActivationStats()

            def hook(module, args, key=key):
                stats[key].update(args[0])

            handles.append(linear.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            loss = _lm_loss(model, calib_ids)
    finally:
        for h in handles:
            h.remove()
    del loss
    ActivationStats.all_reduce(list(stats.values()))  # every rank's tokens (nothing in one process)

    def rows(name):
        return wanda_channel_scores(modules[name].weight.detach(), stats[name], axis=0)

    def cols(name):
        return wanda_channel_scores(modules[name].weight.detach(), stats[name], axis=1)

    return _fold_all(model, rows, cols, "activation", progress)


def _magnitude_scores(model, importance, progress):
    from layerprune.scoring.dispatch import weight_scores

    modules = dict(model.named_modules())

    def rows(name):
        return weight_scores(modules[name].weight.detach(), kind=importance, axis=0)

    def cols(name):
        return weight_scores(modules[name].weight.detach(), kind=importance, axis=1)

    return _fold_all(model, rows, cols, importance, progress)


def _fold_all(model, rows, cols, importance, progress):
    kv_scores: list[torch.Tensor] = []
    channel_scores: list[torch.Tensor] = []
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    for l, layer in enumerate(tqdm(layers, desc=f"{importance} group scores", disable=not progress, leave=False)):
        kv, ch = fold_layer_scores(adapter.geometry(model, layer), adapter.layer_prefix(l), rows, cols)
        kv_scores.append(kv)
        channel_scores.append(ch)
    return kv_scores, channel_scores


def fold_layer_scores(geometry, prefix: str, rows, cols) -> tuple[torch.Tensor, torch.Tensor]:
    """(KV-group scores, channel scores) of the decoder layer ``prefix`` (``model.layers.l``), on CPU.

    ``rows(name)`` / ``cols(name)`` give the per-row / per-column element scores of the projection ``name``
    (``{prefix}.self_attn.q_proj`` ...); they are checked finite and folded as the module docstring says.
    """
    heads, kv_heads, head_dim = geometry.num_q_heads, geometry.num_kv_heads, geometry.head_dim
    p = prefix
    attn = {n: _check_finite(rows(f"{p}.self_attn.{n}"), f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")}
    o_cols = _check_finite(cols(f"{p}.self_attn.o_proj"), f"{p}.self_attn.o_proj")
    kv = fold_attention_scores(attn["q_proj"], attn["k_proj"], attn["v_proj"], o_cols, heads, kv_heads, head_dim)
    gate = _check_finite(rows(f"{p}.mlp.gate_proj"), f"{p}.mlp.gate_proj")
    up = _check_finite(rows(f"{p}.mlp.up_proj"), f"{p}.mlp.up_proj")
    down = _check_finite(cols(f"{p}.mlp.down_proj"), f"{p}.mlp.down_proj")
    ch = fold_mlp_scores(gate, up, down)
    return (_check_finite(kv.detach().cpu(), f"{p}.self_attn (KV groups)"),
            _check_finite(ch.detach().cpu(), f"{p}.mlp (channels)"))


def element_group_scores(
    model: torch.nn.Module,
    calib_ids: torch.Tensor | None,
    importance: str = "taylor",
    progress: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(kv_group_scores[l]: float32 [Hkv_l], channel_scores[l]: float32 [I_l]) for every decoder
    layer, read from the model's current (possibly already pruned) shapes. Higher = keep."""
    if importance not in IMPORTANCE_KINDS:
        raise InvalidInputError(f"importance: expected one of {', '.join(IMPORTANCE_KINDS)}, got {importance!r}")
    adapter_for(model).decoder_layers(model)
    if importance in ("l1", "l2"):
        return _magnitude_scores(model, importance, progress)
    if calib_ids is None or not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.shape[1] < 2:
        raise InvalidInputError(f"calib_ids: importance {importance!r} needs a [n_samples, seq_len>=2] token batch")
    calib_ids = calib_ids.long().to(next(model.parameters()).device)
    if importance == "activation":
        return _activation_scores(model, calib_ids, progress)
    return _gradient_scores(model, calib_ids, importance, progress)


def score_summary(scores: Sequence[torch.Tensor]) -> list[dict[str, float]]:
    """min / mean / max per layer (for reports)."""
    out = []
    for s in scores:
        s = s.float()
        out.append({"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max())})
    return [{k: (v if math.isfinite(v) else None) for k, v in d.items()} for d in out]
