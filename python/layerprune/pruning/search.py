"""Evolutionary search over allocations, seeded by the solver's answer and scored on the whole model's output
(EvoPress, Sieberling et al. 2024; Týr-the-Pruner, 2025).

The solvers add up per-layer loss curves measured one layer at a time; the search scores an allocation by what
the whole pruned model does, so it sees how the layers' errors interact.

* **Candidates** are one option per item of the allocation knapsack (:mod:`layerprune.allocation.knapsack`):
  every candidate removes parameters inside the solver's window ``[T, T + granule]`` and at least the KV-cache
  and FLOPs targets that are set, as the seed does.
* **A move** is a level switch: one item prunes a level more and another a level less (a level: one KV group, or a
  ``1/16`` share of an MLP's widths); then the items it moved go one option at a time, a step landing inside the
  window first, until the parameters removed are back in the window. A draw whose result breaks a budget is
  drawn again. An offspring makes 1 to ``max_moves`` moves (EvoPress's mutation).
* **Assembly** (Týr's supernet): layer ``l`` keeping ``k`` units of a projection (o_proj: KV groups, down_proj:
  channels) keeps the first ``k`` units left by the layer's structured-OBS removal order, with the least-squares
  refit of the kept columns ``W_S = W Ĥ[:, S] Ĥ[S, S]⁻¹``; the removed columns are zero, so the dense model with
  these weights computes the pruned model's function exactly. The Grams ``Ĥ`` are those the refit of the seed
  collected (:func:`seed_refit`: each layer's inputs with the layers below pruned to the seed's widths and refit,
  the error correction of the final model), so the seed's fitness is its final model's and a candidate's is
  close to its own. Orders are computed once; a variant is solved once and kept.
* **Fitness** is the mean over positions of KL(p_dense ‖ q_candidate) on held-out calibration windows (rows of
  the calibration text the refit never read; never test text), from the dense model's top-K next-token
  probabilities plus the tail (:func:`layerprune.importance.divergence.top_k_kl`).
* **Selection** in stages (EvoPress): every offspring is screened on ``screen_samples`` windows (the next ones each
  generation, as EvoPress draws fresh tokens), the best ``survivors`` are scored on all of them, and the best of those replaces the parent only when its fitness
  is lower than the parent's on the same windows. The answer is therefore never worse than the seed. Layers before
  the first one a candidate changes are not rerun: the parent's hidden states entering every layer are kept.

The chosen widths then go through the normal selection and refit (with error correction) like the solver's, and
the pipeline keeps the refit model only when its own KL on the held-out windows is below the seed's refit model's.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layerprune.allocation.knapsack import (Knapsack, build_knapsack, choice_for, feasible, objective, result_for,
                                            widths, windows)
from layerprune.allocation.solve import AllocationResult, AllocationSpec
from layerprune.arch import adapter_for, gqa
from layerprune.errors import InvalidInputError, NumericalError
from layerprune.importance.divergence import teacher_top_k, top_k_kl
from layerprune.models.layer_calls import batch_slice, layer_arguments, layer_call
from layerprune.pruning.refit_loop import refit_kept_weights
from layerprune.refit import DEFAULT_DAMPING, InputGram
from layerprune.refit.lstsq import damping_added, factor_in_place_, solve_with_factor
from layerprune.refit.obs import DEFAULT_BATCH_FRACTION, structured_obs
from layerprune.scoring.selection import LayerKeep

PROJECTIONS = ("o_proj", "down_proj")
# float32 variant weights kept at once (least recently used dropped first)
VARIANT_CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class SearchSettings:
    """How long and how wide the search runs. ``generations``: the most generations; ``time_limit``: seconds after
    which no new generation starts (None: none); ``offspring`` per generation; ``samples`` held-out windows
    the fitness is measured on, ``screen_samples`` of them for the first screen, ``survivors`` offspring scored on
    all; ``top_k`` teacher tokens kept per position (the rest is one tail outcome); ``max_moves`` per offspring."""

    generations: int = 40
    time_limit: float | None = None
    offspring: int = 12
    samples: int = 16
    screen_samples: int = 1
    survivors: int = 2
    top_k: int = 512
    max_moves: int = 3
    seed: int = 0

    def check(self) -> None:
        for name, low in (("generations", 0), ("offspring", 1), ("samples", 1), ("screen_samples", 1),
                          ("survivors", 1), ("top_k", 1), ("max_moves", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise InvalidInputError(f"search_{name}: must be an integer >= {low}, got {v!r}")
        if self.screen_samples > self.samples:
            raise InvalidInputError(f"search_screen_samples: {self.screen_samples} exceeds search_samples "
                                    f"({self.samples})")
        t = self.time_limit
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise InvalidInputError(f"search_time: must be a positive number of seconds, got {t!r}")


@dataclass
class SearchResult:
    """The allocation found, the seed's and its fitness on all windows, and the record of the run: ``history``
    rows ``[generation, seconds, best fitness, candidates evaluated]``."""

    allocation: AllocationResult
    seed_fitness: float
    fitness: float
    history: list[list[float]] = field(default_factory=list)
    accepted: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    tokens: int = 0
    fitness_model: FitnessModel | None = field(default=None, repr=False)
    checks: dict[str, Any] = field(default_factory=dict)  # the refit models' own KL (set by the pipeline)

    @property
    def changed(self) -> bool:
        return self.accepted > 0

    def to_json(self) -> dict[str, Any]:
        return {"seed_fitness": self.seed_fitness, "fitness": self.fitness, "generations": len(self.history) - 1,
                "accepted": self.accepted, "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
                "fitness_tokens": self.tokens, **self.checks, "history": self.history}


class VariantBank:
    """Per layer and projection the weights of every kept count: the units the structured-OBS removal order leaves,
    with the OBS refit of the kept columns ``W_S = W Ĥ[:, S] Ĥ[S, S]⁻¹`` (``Ĥ = H/n + λI``, damped on the whole
    Gram as OBS is), solved when first asked for and cached. Weights are full-width float32 with the removed
    columns zero. The order is OBS's run to the seed's count (``seed_removed``), then on to the deepest count the
    knapsack allows: at the seed's count the kept units and weights are those the final refit chooses."""

    def __init__(self, model: torch.nn.Module, grams: Sequence[dict[str, InputGram]], deepest: Sequence[dict[str, int]],
                 *, seed_removed: Sequence[dict[str, int]] | None = None, damping: float = DEFAULT_DAMPING,
                 cache_bytes: int = VARIANT_CACHE_BYTES) -> None:
        adapter = adapter_for(model)
        self.layers = adapter.decoder_layers(model)
        self.grams = grams
        self.damping = damping
        self.cache_bytes = cache_bytes
        self.dense: list[dict[str, torch.Tensor]] = []
        self.groups: list[dict[str, list[list[int]]]] = []
        self.orders: list[dict[str, list[int]]] = []
        self.lam: list[dict[str, float]] = []
        self._cache: OrderedDict[tuple[int, str, int], torch.Tensor] = OrderedDict()
        self._held = 0
        for l, layer in enumerate(self.layers):
            g = adapter.geometry(model, layer)
            groups = {"o_proj": [gqa.q_rows([j], g.ratio, g.head_dim) for j in range(g.num_kv_heads)],
                      "down_proj": [[c] for c in range(g.intermediate)]}
            dense = {name: self.projection(l, name).weight.detach().clone() for name in PROJECTIONS}
            orders, lams = {}, {}
            for name in PROJECTIONS:
                depth = int(deepest[l][name])
                lams[name] = obs_damping(grams[l][name], damping)
                if depth <= 0:
                    orders[name] = []
                    continue
                first = 0 if seed_removed is None else min(int(seed_removed[l][name]), depth)
                counts = sorted({c for c in (first, depth) if c > 0})
                stage = structured_obs(dense[name], grams[l][name], groups[name], counts, damping=damping,
                                       batch_fraction=None if name == "o_proj" else DEFAULT_BATCH_FRACTION)[-1]
                orders[name] = list(stage.removed)
            self.dense.append(dense)
            self.groups.append(groups)
            self.orders.append(orders)
            self.lam.append(lams)

    def projection(self, l: int, name: str) -> torch.nn.Linear:
        layer = self.layers[l]
        return layer.self_attn.o_proj if name == "o_proj" else layer.mlp.down_proj

    def units(self, l: int, name: str) -> int:
        return len(self.groups[l][name])

    def weight(self, l: int, name: str, kept: int) -> torch.Tensor:
        """Layer ``l``'s ``name`` keeping ``kept`` units (the dense weight when all are kept)."""
        units = self.units(l, name)
        if kept == units:
            return self.dense[l][name]
        removed = units - kept
        if removed > len(self.orders[l][name]):
            raise InvalidInputError(f"layer {l} {name}: {kept} units kept is deeper than the search was prepared for")
        key = (l, name, kept)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        gone = set(self.orders[l][name][:removed])
        columns = [c for i, grp in enumerate(self.groups[l][name]) if i not in gone for c in grp]
        dense = self.dense[l][name]
        w = torch.zeros_like(dense)
        w[:, columns] = obs_refit(dense, self.grams[l][name], columns, self.lam[l][name]).to(dense.dtype)
        self._cache[key] = w
        self._held += w.numel() * w.element_size()
        while self._held > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._held -= old.numel() * old.element_size()
        return w

    def kept_units(self, l: int, name: str, kept: int) -> tuple[int, ...]:
        """The unit indices layer ``l``'s variant keeps (in index order)."""
        gone = set(self.orders[l][name][:self.units(l, name) - kept])
        return tuple(i for i in range(self.units(l, name)) if i not in gone)


def obs_damping(stats: InputGram, damping: float) -> float:
    """The ``λ`` structured OBS damps ``H/n`` with (:func:`layerprune.refit.lstsq.damping_added`)."""
    return damping_added(stats.gram, damping, divisor=max(stats.count, 1))


def obs_refit(weight: torch.Tensor, stats: InputGram, columns: Sequence[int], lam: float) -> torch.Tensor:
    """``W Ĥ[:, S] Ĥ[S, S]⁻¹`` (float64, ``[out, |S|]``) with ``Ĥ = H/n + λI``: the weights structured OBS leaves
    on the kept columns ``S`` after removing the others (the block-inverse identity of its updates)."""
    s = torch.as_tensor(list(columns), dtype=torch.long, device=stats.gram.device)
    n = max(stats.count, 1)
    w = weight.detach().to(stats.gram.device, torch.float64)
    block = stats.gram.index_select(0, s).index_select(1, s) / n
    block.diagonal().add_(lam)
    rhs = w @ (stats.gram.index_select(1, s) / n) + lam * w.index_select(1, s)
    if not factor_in_place_(block):
        raise NumericalError("search: a variant's damped Gram block does not factor")
    return solve_with_factor(rhs, block)


class FitnessModel:
    """The dense model's top-K next-token distribution on the fitness windows, and a candidate's mean KL from it,
    computed with the candidate's variant weights loaded into ``model`` (restored by :meth:`restore`)."""

    def __init__(self, model: torch.nn.Module, bank: VariantBank | None, ids: torch.Tensor, top_k: int,
                 progress: bool = False) -> None:
        self.model = model
        self.bank = bank
        adapter = adapter_for(model)
        self.norm = adapter.final_norm(model)
        self.head = adapter.lm_head(model)
        self.final = lambda z: adapter.final_logits(model.config, z)
        self.layers = adapter.decoder_layers(model)
        device = next(model.parameters()).device
        self.ids = ids.long().to(device)
        self.n = int(ids.shape[0])
        self.positions_per_window = int(ids.shape[1]) - 1
        with torch.no_grad():
            self.hidden0, self.kwargs = layer_arguments(model, input_ids=self.ids)
        self.loaded: dict[tuple[int, str], int] = {} if bank is None else {
            (l, name): bank.units(l, name) for l in range(len(self.layers)) for name in PROJECTIONS}
        vocab = int(self.head.weight.shape[0])
        self.top_k = min(int(top_k), vocab)
        self.teacher: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            hidden = self.hidden0
            for l in tqdm(range(len(self.layers)), desc="search: dense targets", disable=not progress, leave=False):
                hidden = layer_call(self.layers[l], hidden, self.kwargs[l])
            for w in range(self.n):
                logits = self.final(self.head(self.norm(hidden[w, :-1])).float())
                self.teacher.append(teacher_top_k(logits, self.top_k))

    def score(self, other: torch.nn.Module) -> float:
        """Mean KL per position of another model of the same vocabulary (its own forward, a window at a time)."""
        total = 0.0
        with torch.no_grad():
            for w in range(self.n):
                logits = other(input_ids=self.ids[w:w + 1], use_cache=False).logits[0, :-1]
                total += float(top_k_kl(logits, *self.teacher[w]))
        return total / (self.n * self.positions_per_window)

    def load(self, kept: dict[tuple[int, str], int]) -> None:
        """Put the variant weights of ``kept`` ((layer, projection) -> units kept) into the model."""
        with torch.no_grad():
            for key, k in kept.items():
                if self.loaded[key] != k:
                    self.bank.projection(*key).weight.copy_(self.bank.weight(key[0], key[1], k))
                    self.loaded[key] = k

    def restore(self) -> None:
        self.load({key: self.bank.units(*key) for key in self.loaded})

    def kl(self, start: int, entering: list[torch.Tensor], count: int, keep_states: bool = False,
           first: int = 0) -> tuple[float, list[torch.Tensor] | None]:
        """Mean KL per position over ``count`` windows from window ``first``, running layers ``start..L-1`` on
        ``entering[start]`` (the hidden states entering each layer, of every window). With ``keep_states`` (all
        windows only) also the hidden states entering every layer (layers before ``start`` taken from
        ``entering``)."""
        if keep_states and (first, count) != (0, self.n):
            raise InvalidInputError("search: hidden states are kept for all fitness windows only")
        states = list(entering[:start + 1]) if keep_states else None
        kwargs = [{k: batch_slice(v, first, first + count, self.n) for k, v in kw.items()} for kw in self.kwargs]
        with torch.no_grad():
            hidden = entering[start][first:first + count]
            for l in range(start, len(self.layers)):
                hidden = layer_call(self.layers[l], hidden, kwargs[l])
                if states is not None:
                    states.append(hidden)
            total = 0.0
            for w in range(count):
                logits = self.final(self.head(self.norm(hidden[w, :-1])))
                log_p, ids = self.teacher[first + w]
                total += float(top_k_kl(logits, log_p, ids))
        value = total / (count * self.positions_per_window)
        if not math.isfinite(value):
            raise InvalidInputError("search: a candidate's KL is not finite (the model overflows at its dtype)")
        return value, states


def _land(ks: Knapsack, choice: list[int], window: tuple[int, int] | None, rng: np.random.Generator,
          prefer: Sequence[int] = ()) -> None:
    """Move items one option at a time, a step that stays inside the window first, until the parameters removed
    are in ``window`` (or give up after a bounded number of steps; the caller checks feasibility). Items of
    ``prefer`` (those the move already changed) absorb the correction when they can, so fewer layers change."""
    if window is None:
        return
    lo, hi = window
    removed = sum(it.options[j].params for it, j in zip(ks.items, choice))
    for _ in range(sum(len(it.options) for it in ks.items) + 8):
        if lo <= removed <= hi:
            return
        down = removed < lo  # prune more
        moves = []
        for group in (list(prefer), range(len(ks.items))):
            for i in group:
                it, j = ks.items[i], choice[i]
                k = j + 1 if down else j - 1
                if 0 <= k < len(it.options):
                    moves.append((i, k, it.options[k].params - it.options[j].params))
            if moves:
                break
        if not moves:
            return
        inside = [m for m in moves if lo <= removed + m[2] <= hi]
        if inside:
            pool = inside
        else:  # the smallest steps, so the next step can land
            least = min(abs(m[2]) for m in moves)
            pool = [m for m in moves if abs(m[2]) == least]
        i, k, delta = pool[int(rng.integers(len(pool)))]
        choice[i] = k
        removed += delta


def level(options: int) -> int:
    """Options one level switch moves an item by: a ``1 / LEVELS`` share of its range, at least one (a KV group;
    about 6% of an MLP's channels at ``mlp_step`` 1)."""
    return max(1, round((options - 1) / LEVELS))


LEVELS = 16


def mutate(ks: Knapsack, parent: Sequence[int], window: tuple[int, int] | None, rng: np.random.Generator,
           max_moves: int = 3, tries: int = 32) -> list[int] | None:
    """An offspring of ``parent``: 1..``max_moves`` level switches (one item prunes :func:`level` options more,
    another that many fewer), landed back in the budget window by the items it moved; None when ``tries`` draws
    give no feasible offspring different from the parent."""
    movable = [i for i, it in enumerate(ks.items) if len(it.options) > 1]
    if len(movable) < 2:
        return None
    for _ in range(tries):
        kid = list(parent)
        moves = 1 + min(int(rng.geometric(0.5)) - 1, max_moves - 1)
        moved: list[int] = []
        for _ in range(moves):
            a, b = (int(x) for x in rng.choice(movable, size=2, replace=False))
            last = len(ks.items[a].options) - 1
            if kid[a] < last and kid[b] > 0:
                kid[a] = min(kid[a] + level(last + 1), last)
                kid[b] = max(kid[b] - level(len(ks.items[b].options)), 0)
                moved += [a, b]
        _land(ks, kid, window, rng, prefer=moved)
        if kid != list(parent) and feasible(ks, kid, window):
            return kid
    return None


def _kept_map(ks: Knapsack, spec: AllocationSpec, choice: Sequence[int]) -> dict[tuple[int, str], int]:
    g, f = widths(spec, ks, list(choice))
    out: dict[tuple[int, str], int] = {}
    for l in range(len(spec.layers)):
        out[(l, "o_proj")] = g[l]
        out[(l, "down_proj")] = f[l]
    return out


def _deepest(ks: Knapsack, spec: AllocationSpec) -> list[dict[str, int]]:
    """Per layer the most units the knapsack's options remove from each projection."""
    out = [{"o_proj": 0, "down_proj": 0} for _ in spec.layers]
    for it in ks.items:
        s = spec.layers[it.layer]
        if it.kind in ("attn", "tied"):
            out[it.layer]["o_proj"] = max(s.num_kv_heads - o.kv_groups for o in it.options)
        if it.kind in ("mlp", "tied"):
            out[it.layer]["down_proj"] = max(s.intermediate - o.mlp for o in it.options)
    return out


@dataclass
class SeedRefit:
    """The solver's allocation pruned and refit as the final model is (a masked copy of the model), the keep the
    surgery applies, the refit's report, and the Grams the refit collected: each layer's projections' inputs with
    the layers below pruned and refit (error correction), which the search's variants are refit on."""

    model: torch.nn.Module
    keep: list[LayerKeep]
    report: dict[str, Any]
    grams: list[dict[str, InputGram]]


def seed_refit(model: torch.nn.Module, seed: AllocationResult, refit_ids: torch.Tensor, *,
               damping: float = DEFAULT_DAMPING, error_correction: bool = True, progress: bool = True) -> SeedRefit:
    """Refit a copy of ``model`` at ``seed``'s widths (structured-OBS selection, least squares), keeping the Grams."""
    work = copy.deepcopy(model)
    keep = [LayerKeep(tuple(range(a.kv_groups_kept)), tuple(range(a.mlp_kept))) for a in seed.layers]
    grams: list[dict[str, InputGram]] = []
    report, chosen = refit_kept_weights(work, keep, refit_ids, mode="lstsq", damping=damping,
                                        error_correction=error_correction, progress=progress, select="obs",
                                        grams_out=grams)
    return SeedRefit(work, chosen, report, grams)


def search_allocation(
    model: torch.nn.Module,
    spec: AllocationSpec,
    seed: AllocationResult,
    grams: Sequence[dict[str, InputGram]],
    fitness_ids: torch.Tensor,
    settings: SearchSettings = SearchSettings(),
    *,
    damping: float = DEFAULT_DAMPING,
    progress: bool = True,
) -> SearchResult:
    """Search allocations of ``spec`` from ``seed`` (module docstring). ``model`` is the dense model: its o_proj and
    down_proj weights are swapped during the search and put back before this returns. ``grams``: per layer the
    dense input Grams of o_proj and down_proj (the refit batch's); ``fitness_ids`` ``[n, T]``: held-out windows,
    at least ``settings.samples`` of them."""
    settings.check()
    start_time = time.perf_counter()
    if fitness_ids.dim() != 2 or fitness_ids.shape[0] < settings.samples or fitness_ids.shape[1] < 2:
        raise InvalidInputError(f"search: need {settings.samples} fitness windows of >= 2 tokens, got "
                                f"{tuple(fitness_ids.shape)}")
    ks = build_knapsack(spec)
    kv0 = [int(a.kv_groups_kept) for a in seed.layers]
    mlp0 = [int(a.mlp_kept) for a in seed.layers]
    parent = choice_for(ks, kv0, mlp0)
    window = next((w for _, w in windows(ks) if feasible(ks, parent, w)), None)
    if window is None and ks.params_window is not None:
        raise InvalidInputError("search: the seed allocation is outside the budget window")
    rng = np.random.default_rng(settings.seed)
    seed_removed = [{"o_proj": s.num_kv_heads - g, "down_proj": s.intermediate - f}
                    for s, g, f in zip(spec.layers, kv0, mlp0)]
    bank = VariantBank(model, grams, _deepest(ks, spec), seed_removed=seed_removed, damping=damping)
    fit = FitnessModel(model, bank, fitness_ids[:settings.samples], settings.top_k, progress=progress)
    num_layers = len(spec.layers)
    evaluations = 0
    try:
        fit.load(_kept_map(ks, spec, parent))
        parent_fitness, parent_states = fit.kl(0, [fit.hidden0], settings.samples, keep_states=True)
        evaluations += 1
        seed_fitness = parent_fitness
        history = [[0, round(time.perf_counter() - start_time, 3), parent_fitness, evaluations]]
        accepted = 0
        bar = tqdm(range(1, settings.generations + 1), desc="allocation search", disable=not progress, leave=False)
        for generation in bar:
            if settings.time_limit is not None and time.perf_counter() - start_time >= settings.time_limit:
                break
            kids: list[list[int]] = []
            for _ in range(settings.offspring):
                kid = mutate(ks, parent, window, rng, settings.max_moves)
                if kid is not None and kid not in kids:
                    kids.append(kid)
            if not kids:
                break
            parent_map = _kept_map(ks, spec, parent)
            # a new screening window each generation (EvoPress draws fresh tokens): the screen follows no one window
            screen_from = ((generation - 1) * settings.screen_samples) % (settings.samples - settings.screen_samples + 1)
            screened = []
            for kid in kids:
                kept = _kept_map(ks, spec, kid)
                first = min((key[0] for key, k in kept.items() if parent_map[key] != k), default=num_layers)
                fit.load(kept)
                value, _ = fit.kl(first, parent_states, settings.screen_samples, first=screen_from)
                evaluations += 1
                screened.append((value, first, kid))
            screened.sort(key=lambda t: t[0])
            best = (parent_fitness, None, None)
            for _, first, kid in screened[:settings.survivors]:
                fit.load(_kept_map(ks, spec, kid))
                value, states = fit.kl(first, parent_states, settings.samples, keep_states=True)
                evaluations += 1
                if value < best[0]:
                    best = (value, kid, states)
            if best[1] is not None:
                parent_fitness, parent, parent_states = best[0], best[1], best[2]
                accepted += 1
            history.append([generation, round(time.perf_counter() - start_time, 3), parent_fitness, evaluations])
            bar.set_postfix(kl=f"{parent_fitness:.4f}", seed=f"{seed_fitness:.4f}", accepted=accepted)
    finally:
        fit.restore()
    g, f = widths(spec, ks, parent)
    seconds = time.perf_counter() - start_time
    allocation = result_for(spec, seed, g, f, solver=f"search({seed.solver})", objective=objective(ks, parent),
                            seconds=seed.solve_seconds + seconds,
                            notes=[f"searched from {seed.solver}: KL {seed_fitness:.5f} -> {parent_fitness:.5f}"])
    return SearchResult(allocation=allocation, seed_fitness=seed_fitness, fitness=parent_fitness, history=history,
                        accepted=accepted, evaluations=evaluations, seconds=seconds,
                        tokens=settings.samples * fit.positions_per_window, fitness_model=fit)


__all__ = ["FitnessModel", "SearchResult", "SearchSettings", "SeedRefit", "VariantBank", "mutate", "search_allocation",
           "seed_refit"]
