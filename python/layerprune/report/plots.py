"""PNG plots for `layerprune compare` (matplotlib, Agg backend, no display needed).

- `plot_importance`: per-layer importance of each layer-importance method (attention, MLP, combined);
- `plot_allocation`: per-layer kept KV groups and MLP channels of each method at one target ratio;
- `plot_ppl_vs_ratio`: perplexity against target ratio per method (only meaningful with several ratios);
- `plot_heal`: a healing run's training and held-out losses, and its held-out perplexity, against tokens seen;
- `plot_search`: the allocation search's best fitness against generations and seconds.

Each function writes through `save_figure` (a temporary file, then a rename), like every other output.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Write `fig` as a PNG at `path` (temporary file, then rename) and close it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".png", dir=target.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return target


def plot_importance(layer_importance: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """One panel per importance method; lines for attention, MLP and combined importance per layer."""
    names = list(layer_importance)
    if not names:
        raise ValueError("plot_importance: no layer importance to plot")
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.8 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        li = layer_importance[name]
        for part, style in (("attn", "o-"), ("mlp", "s-"), ("combined", "k^--")):
            values = li.get(part)
            if values is None:
                continue
            ys = [float("nan") if v is None else float(v) for v in values]
            ax.plot(range(len(ys)), ys, style, label=part, markersize=3)
        ax.set_title(f"layer importance: {name}")
        ax.set_xlabel("layer")
        ax.set_ylabel("importance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_allocation(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Two panels: kept KV groups per layer and kept MLP channels per layer, one line per method."""
    with_layers = [r for r in runs if r.get("layers")]
    if not with_layers:
        raise ValueError("plot_allocation: no run has a per-layer allocation")
    fig, (ax_kv, ax_mlp) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in with_layers:
        label = r["method"]
        layers = r["layers"]
        xs = range(len(layers))
        dashed = "--" if r["method"] == "dense" else "-"
        ax_kv.plot(xs, [l["kv_groups_kept"] for l in layers], dashed, marker="o", markersize=3, label=label)
        ax_mlp.plot(xs, [l["mlp_kept"] for l in layers], dashed, marker="o", markersize=3, label=label)
    ax_kv.set_ylabel("kept KV groups")
    ax_mlp.set_ylabel("kept MLP channels")
    ax_mlp.set_xlabel("layer")
    for ax in (ax_kv, ax_mlp):
        ax.grid(alpha=0.3)
    ax_kv.legend(fontsize=8)
    if title:
        ax_kv.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_ppl_vs_ratio(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Perplexity (log scale) against the target ratio, one line per method; dense as a horizontal line."""
    pruned = [r for r in runs if r["method"] != "dense" and r.get("ppl") is not None and math.isfinite(r["ppl"])]
    if not pruned:
        raise ValueError("plot_ppl_vs_ratio: no pruned run to plot")
    methods: list[str] = []
    for r in pruned:
        if r["method"] not in methods:
            methods.append(r["method"])
    many = len(methods) > 10  # past the default colour cycle: tab20, legend beside the axes
    fig, ax = plt.subplots(figsize=(10.5, 4.5) if many else (7, 4.5))
    colours = plt.get_cmap("tab20").colors if many else [None] * len(methods)
    for method, colour in zip(methods, colours):
        points = sorted((r["target_ratio"], r["ppl"]) for r in pruned if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=method, color=colour)
    dense = next((r for r in runs if r["method"] == "dense"), None)
    if dense is not None:
        ax.axhline(dense["ppl"], color="gray", linestyle=":", label=f"dense ({dense['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("target pruning ratio (of all parameters)")
    ax.set_ylabel("perplexity (log)")
    ax.grid(alpha=0.3, which="both")
    if many:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heal(history: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike[str]) -> Path:
    """Two panels against training tokens: the training and held-out distillation losses, and the held-out
    perplexity. ``history`` is a heal report's: ``train`` rows [step, tokens, loss, lr], ``held_out`` rows
    [step, tokens, loss, kl, ppl]."""
    train, held = list(history.get("train", ())), list(history.get("held_out", ()))
    if not held:
        raise ValueError("plot_heal: no held-out evaluation to plot")
    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        loss_ax.plot([r[1] for r in train], [r[2] for r in train], "-", alpha=0.6, label="training batch")
    loss_ax.plot([r[1] for r in held], [r[2] for r in held], "o-", label="held-out")
    loss_ax.set_xlabel("training tokens")
    loss_ax.set_ylabel("distillation loss per token")
    loss_ax.set_yscale("log")
    loss_ax.grid(alpha=0.3, which="both")
    loss_ax.legend(fontsize=8)
    ppl_ax.plot([r[1] for r in held], [r[4] for r in held], "s-", color="tab:green")
    ppl_ax.set_xlabel("training tokens")
    ppl_ax.set_ylabel("held-out perplexity")
    ppl_ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_search(search: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """The allocation search's best fitness (mean KL from the dense model on its held-out windows) against
    generations and against seconds, the solver's seed as a dashed line. ``search`` is a prune report's
    ``search`` entry (``history`` rows [generation, seconds, fitness, evaluations])."""
    rows = list(search.get("history", ()))
    if not rows:
        raise ValueError("plot_search: no generation to plot")
    fig, (gen_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, label in ((gen_ax, 0, "generation"), (time_ax, 1, "seconds")):
        ax.plot([r[column] for r in rows], [r[2] for r in rows], "o-", markersize=3, label="best candidate")
        ax.axhline(float(search["seed_fitness"]), color="tab:gray", linestyle="--", label="solver's allocation")
        ax.set_xlabel(label)
        ax.set_ylabel("KL from the dense model per token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"allocation search: {search.get('accepted', 0)} improvements in {len(rows) - 1} generations")
    fig.tight_layout()
    return save_figure(fig, path)


def is_png(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(PNG_MAGIC)) == PNG_MAGIC
