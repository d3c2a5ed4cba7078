"""GradientScorer: Taylor scores computed from gradients as backward produces them.

Each hooked weight gets a `register_post_accumulate_grad_hook`. When its gradient is ready the
hook folds it into per-ROW (axis=0) and per-COLUMN (axis=1) float32 score accumulators
(group_size=1) and, with `free_grads=True`, drops `param.grad`, so the peak memory of a
calibration backward is weights + activations + the largest single gradient instead of
weights + all gradients.

Several backward passes ("micro-batches") — the three modes, for a weight W:

* `batch` (default): every backward pass is scored on its own and the scores add up:
  S = Σ_b score(W, G_b). With ONE backward over the whole calibration batch this is exactly
  LLM-Pruner's `param_first` / Torch-Pruning's Taylor (gradient of the summed/mean loss, then
  |W·G|). With several micro-batches, Σ_b |W·G_b| ≠ |W·Σ_b G_b|. Extra memory: none.
  With free_grads=False, torch keeps accumulating `.grad`, so call `step()` (and zero the
  grads) after every backward; a second backward in one step raises.
* `accumulate`: the micro-batches of one step are ONE batch: G = Σ_b G_b is accumulated
  (free_grads=True: in a float32 buffer per weight, memory = 4 bytes × hooked weights;
  free_grads=False: in `param.grad` as torch does) and scored at `step()` (or on first read):
  S = Σ_steps score(W, Σ_b G_b). Equals one backward over the concatenated step batch for a
  summed loss (for a mean loss, scores scale by the number of micro-batches: same ranking).
* `per_sample` (LLM-Pruner `param_second` / `param_mix`): each backward is ONE sample, then
  `step()`. The scorer keeps G_sum = Σ_s g_s and H_sum = Σ_s g_s² in float32 (memory = 4 or 8
  bytes × hooked weights) and, at the end, scores with G = G_sum / N and H = H_sum / N (N =
  number of steps): H is LLM-Pruner's `acc_grad` (Σ g_s² / N) and G equals its full-batch
  gradient of the mean loss when samples have the same token count. Needs free_grads=True.

`l1` / `l2` do not use gradients: they are computed from the weight when read.
Kinds `taylor2` / `taylor-mix` need `mode="per_sample"`.

Several processes:

* Replicated weights inside :func:`layerprune.distributed.data_parallel` (each rank back-propagates its own
  calibration samples): a gradient is summed over the ranks before it is scored (`batch`), a step's sum
  before it is scored (`accumulate`), and Σ g_s, Σ g_s² and the step count at the end (`per_sample`). Every
  rank then holds the scores of the whole batch.
* Weights sharded by rows over a process group (FSDP2 `fully_shard`: DTensor parameters placed `Shard(0)`):
  FSDP calls the hook with this rank's rows of the gradient once its reduce-scatter has summed them over
  the ranks; they are scored at once and dropped, so a rank holds its weight shard and one reduced gradient
  shard. Row scores come from the local rows and are gathered in rank order; column scores are partial sums
  over the local rows, summed over the ranks when read. `vectorize` columns (|Σ_i W_ij·G_ij|) are summed
  signed over the ranks after each backward, then the absolute value taken. `per_sample` is refused: the
  reduce-scatter adds every rank's sample into one gradient.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from layerprune import distributed
from layerprune.arch import find_adapter
from layerprune.errors import InternalError, InvalidInputError
from layerprune.scoring.reference import NEEDS_FISHER, NEEDS_GRAD, SCORE_KINDS

MODES: tuple[str, ...] = ("batch", "accumulate", "per_sample")


def row_shard_group(name: str, weight: torch.Tensor):
    """The process group ``weight`` is sharded over by rows (a DTensor placed ``Shard(0)`` on a 1-D mesh, as
    FSDP2 leaves it), or None for a plain tensor."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    if not isinstance(weight, DTensor):
        return None
    placements = tuple(weight.placements)
    if weight.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) \
            or placements[0].dim != 0:
        raise InvalidInputError(f"module_filter: the weight of {name!r} is distributed as {placements} over a "
                                f"{weight.device_mesh.ndim}-D mesh; only row shards (FSDP2's Shard(0)) are scored")
    return weight.device_mesh.get_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _sum_over_ranks(g: torch.Tensor) -> torch.Tensor:
    """``g`` summed over the data-parallel ranks, in place, and returned in float32 at least: a bfloat16 / float16
    gradient is summed in float32 (an all-reduce in its own dtype, as NCCL does it, rounds at every rank it adds)
    and the float32 sum is what gets scored; ``g`` receives the rounded sum, as a plain all-reduce leaves it."""
    if g.dtype in (torch.float32, torch.float64):
        distributed.all_reduce_sum_([g])
        return g
    wide = g.float()
    distributed.all_reduce_sum_([wide])
    g.copy_(wide)
    return wide


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows each rank holds when ``rows`` are split as ``torch.chunk`` does (FSDP2 / DTensor ``Shard(0)``)."""
    size = -(-rows // world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def _default_modules(model: nn.Module) -> dict[str, nn.Linear]:
    adapter = find_adapter(model)
    if adapter is None:
        raise InvalidInputError("model: not a supported causal LM; pass module_filter=(name, module) -> bool")
    inside = {id(m) for layer in adapter.decoder_layers(model) for m in layer.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}


class GradientScorer:
    """Context manager that scores every hooked weight's gradient as soon as it is ready.

    `module_filter(name, module) -> bool` selects modules with a 2-D `.weight` (default: every
    nn.Linear inside `model.model.layers`). Names are module names, e.g.
    "model.layers.0.self_attn.q_proj".
    """

    def __init__(
        self,
        model: nn.Module,
        kinds=("taylor",),
        module_filter=None,
        free_grads: bool = True,
        *,
        mode: str = "batch",
        backend: str = "auto",
    ) -> None:
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not kinds:
            raise InvalidInputError("kinds: at least one score kind is needed")
        for k in kinds:
            if k not in SCORE_KINDS:
                raise InvalidInputError(f"kinds: unknown score kind {k!r}; expected some of {', '.join(SCORE_KINDS)}")
        if mode not in MODES:
            raise InvalidInputError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if mode != "per_sample" and any(k in NEEDS_FISHER for k in kinds):
            raise InvalidInputError("kinds: taylor2 / taylor-mix need the Fisher diagonal: use mode='per_sample'")
        if mode == "per_sample" and not free_grads:
            raise InvalidInputError("free_grads: mode='per_sample' reads each sample's gradient: needs free_grads=True")
        if module_filter is None:
            modules = _default_modules(model)
        else:
            modules = {n: m for n, m in model.named_modules() if n and module_filter(n, m)}
        for n, m in modules.items():
            w = getattr(m, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise InvalidInputError(f"module_filter: module {n!r} has no 2-D weight")
        if not modules:
            raise InvalidInputError("module_filter: selected no module")
        self._shard_groups = {n: g for n, m in modules.items() if (g := row_shard_group(n, m.weight)) is not None}
        if self._shard_groups and mode == "per_sample":
            raise InvalidInputError(
                "mode: per_sample cannot score FSDP-sharded weights (the reduce-scatter adds the ranks' samples into "
                "one gradient); score a replicated model under layerprune.distributed.data_parallel instead"
            )
        # Replicated weights of data-parallel calibration: gradients are partial sums over this rank's samples.
        self._data_parallel = distributed.active() is not None
        self.model = model
        self.kinds = kinds
        self.mode = mode
        self.free_grads = free_grads
        self.backend = backend
        self.modules: dict[str, nn.Module] = modules
        self._grad_kinds = [k for k in kinds if k in NEEDS_GRAD or k in NEEDS_FISHER]
        self._rows: dict[tuple[str, str], torch.Tensor] = {}
        self._cols: dict[tuple[str, str], torch.Tensor] = {}
        self._gsum: dict[str, torch.Tensor] = {}
        self._hsum: dict[str, torch.Tensor] = {}
        self._seen: set[str] = set()
        self._handles: list = []
        self.steps = 0
        self._finalized = False

    # ---- hooks -------------------------------------------------------------------------
    def __enter__(self) -> GradientScorer:
        for name, module in self.modules.items():
            p = module.weight
            if not p.requires_grad:
                raise InvalidInputError(f"model: weight of {name!r} does not require grad; it cannot be scored")
            self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _add(self, name: str, kind: str, w: torch.Tensor, g, h) -> None:
        from layerprune.scoring.dispatch import weight_scores

        group = self._shard_groups.get(name)
        for axis, store in ((0, self._rows), (1, self._cols)):
            if group is not None and axis == 1 and kind == "vectorize":
                # |Σ_i W_ij G_ij| over ALL rows: the signed partial sums of every rank first
                s = (w.float() * g.float()).sum(0)
                distributed.all_reduce_sum_([s], group=group)
                s = s.abs()
            elif w.shape[0] == 0:  # an empty row shard (more ranks than rows)
                s = torch.zeros(w.shape[1] if axis == 1 else 0, dtype=torch.float32, device=w.device)
            else:
                s = weight_scores(w, g, h, kind=kind, axis=axis, backend=self.backend).to(w.device)
            key = (name, kind)
            if key in store:
                store[key] += s
            else:
                store[key] = s

    @torch.no_grad()
    def _on_grad(self, name: str, param: torch.Tensor) -> None:
        if self._finalized:
            raise InvalidInputError("GradientScorer: scores were already read; start a new scorer for more batches")
        g = param.grad
        if g is None:
            return
        if name in self._shard_groups:
            g = _local(g)
        elif self._data_parallel and self.mode == "batch":
            g = _sum_over_ranks(g)
        if self.mode == "batch":
            if not self.free_grads and name in self._seen:
                raise InvalidInputError(
                    f"GradientScorer: second backward for {name!r} in one step with free_grads=False "
                    "(.grad accumulates): call model.zero_grad() and scorer.step() after each backward"
                )
            self._seen.add(name)
            w = _local(param).detach()
            for k in self._grad_kinds:
                self._add(name, k, w, g, None)
        elif self.mode == "accumulate":
            if self.free_grads:
                if name in self._gsum:
                    self._gsum[name] += g
                else:
                    self._gsum[name] = g.float().clone() if g.dtype == torch.float32 else g.float()
        else:  # per_sample
            gf = g.float()
            if any(k in NEEDS_GRAD for k in self._grad_kinds):
                if name in self._gsum:
                    self._gsum[name] += gf
                else:
                    self._gsum[name] = gf.clone() if gf is g else gf
            sq = gf * gf
            if name in self._hsum:
                self._hsum[name] += sq
            else:
                self._hsum[name] = sq
        if self.free_grads:
            param.grad = None

    # ---- steps ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Marks the end of a step: one sample (per_sample), one batch of micro-batches
        (accumulate) or one backward (batch)."""
        if self._finalized:
            raise InvalidInputError("GradientScorer: scores were already read; start a new scorer for more batches")
        self.steps += 1
        self._seen.clear()
        if self.mode == "accumulate":
            self._score_accumulated()

    def _score_accumulated(self) -> None:
        for name, module in self.modules.items():
            w = _local(module.weight).detach()
            g = self._gsum.pop(name, None) if self.free_grads else module.weight.grad
            if g is None:
                continue
            g = _local(g)
            if self._data_parallel and name not in self._shard_groups:
                g = _sum_over_ranks(g)
            for k in self._grad_kinds:
                self._add(name, k, w if w.dtype == g.dtype else w.float(), g, None)

    @torch.no_grad()
    def finalize(self) -> None:
        """Computes any pending scores (called by the first `row_scores` / `col_scores`)."""
        if self._finalized:
            return
        if self.mode == "accumulate" and self._gsum:
            self._score_accumulated()  # micro-batches after the last step() form one more step
        if self.mode == "per_sample" and self._data_parallel:
            # Σ g_s, Σ g_s² and the sample count of every rank, in the modules' order (the same on every rank)
            distributed.all_reduce_sum_([t for name in self.modules for t in (self._gsum.get(name), self._hsum.get(name))
                                         if t is not None])
            self.steps = distributed.global_count(self.steps)
        if self.mode == "per_sample" and self._hsum:
            n = self.steps
            if n == 0:
                raise InvalidInputError("GradientScorer: mode='per_sample' needs step() after every sample's backward")
            for name, module in self.modules.items():
                h = self._hsum.pop(name, None)
                if h is None:
                    continue
                h /= n
                g = self._gsum.pop(name, None)
                if g is not None:
                    g /= n
                w = module.weight.detach()
                w = w if w.dtype == torch.float32 else w.float()
                for k in self._grad_kinds:
                    self._add(name, k, w, g, h)
        if self._shard_groups:
            self._gather_shards()
        self._finalized = True

    def _gather_shards(self) -> None:
        """Rows of sharded weights gathered in rank order; their column partial sums summed over the ranks."""
        import torch.distributed as dist

        groups: dict[int, tuple[object, list[str]]] = {}
        for name, group in self._shard_groups.items():
            groups.setdefault(id(group), (group, []))[1].append(name)
        for group, names in groups.values():
            world, me = dist.get_world_size(group), dist.get_rank(group)
            keys = [(n, k) for n in names for k in self._grad_kinds if (n, k) in self._rows]
            distributed.all_reduce_sum_([self._cols[key] for key in keys if key[1] != "vectorize"], group=group)
            if not keys:
                continue
            sizes = {key: shard_rows(self.modules[key[0]].weight.shape[0], world) for key in keys}
            for key in keys:
                if self._rows[key].numel() != sizes[key][me]:
                    raise InternalError(f"{key[0]}: rank {me} holds {self._rows[key].numel()} rows, a row shard of "
                                        f"{self.modules[key[0]].weight.shape[0]} over {world} ranks has {sizes[key][me]}")
            flat = distributed.all_gather_rows(torch.cat([self._rows[key] for key in keys]), group)
            pieces: dict[tuple[str, str], list[torch.Tensor]] = {key: [] for key in keys}
            offset = 0
            for r in range(world):
                for key in keys:
                    pieces[key].append(flat[offset : offset + sizes[key][r]])
                    offset += sizes[key][r]
            for key in keys:
                self._rows[key] = torch.cat(pieces[key])

    def _sharded_magnitude(self, name: str, kind: str, axis: int) -> torch.Tensor:
        """l1 / l2 of a row-sharded weight: local rows gathered, local column sums summed over the ranks."""
        from layerprune.scoring.dispatch import weight_scores

        group = self._shard_groups[name]
        w = _local(self.modules[name].weight).detach()
        if w.shape[0] == 0:
            local = torch.zeros(0 if axis == 0 else w.shape[1], dtype=torch.float32, device=w.device)
        else:
            local = weight_scores(w, kind=kind, axis=axis, backend=self.backend)
        if axis == 0:
            return distributed.all_gather_rows(local, group)
        distributed.all_reduce_sum_([local], group=group)
        return local

    # ---- results -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.modules)

    def _get(self, store, name: str, kind: str, axis: int) -> torch.Tensor:
        if name not in self.modules:
            raise InvalidInputError(f"name: {name!r} is not a scored module")
        if kind not in self.kinds:
            raise InvalidInputError(f"kind: {kind!r} was not requested (kinds={self.kinds})")
        if kind in ("l1", "l2"):
            from layerprune.scoring.dispatch import weight_scores

            if name in self._shard_groups:
                return self._sharded_magnitude(name, kind, axis)
            return weight_scores(self.modules[name].weight.detach(), kind=kind, axis=axis, backend=self.backend)
        self.finalize()
        if (name, kind) not in store:
            raise InvalidInputError(f"name: no gradient reached {name!r} (run a backward pass inside the scorer)")
        return store[(name, kind)]

    def row_scores(self, name: str, kind: str = "taylor") -> torch.Tensor:
        """float32 score per output row of `name`'s weight."""
        return self._get(self._rows, name, kind, 0)

    def col_scores(self, name: str, kind: str = "taylor") -> torch.Tensor:
        """float32 score per input column of `name`'s weight."""
        return self._get(self._cols, name, kind, 1)
