"""Pruned tiny models of every family, saved as layerprune folders, for the GGUF export tests."""

from __future__ import annotations

from pathlib import Path

from families import CASES, make_model, make_tokenizer

from layerprune.arch import layer_shapes
from layerprune.export import save_pruned
from layerprune.models import load_pruned
from layerprune.pruning import prune_model
from layerprune.scoring.selection import LayerKeep

CASE_BY_NAME = {c.name: c for c in CASES}


def heterogeneous_keep(model) -> list[LayerKeep]:
    """Different KV-group counts (where there are 2+ groups) and MLP widths in every layer."""
    keep = []
    for i, s in enumerate(layer_shapes(model)):
        groups_total = s["num_kv_heads"]
        count = max(1, groups_total - (i % 2) * max(1, groups_total // 2))
        groups = tuple(sorted({(i + k) % groups_total for k in range(count)}))
        channels = tuple(range(i, s["intermediate"], 2 + i))
        keep.append(LayerKeep(kv_heads=groups, mlp_channels=channels))
    return keep


def homogeneous_keep(model) -> list[LayerKeep]:
    """The same widths in every layer (half the KV groups, half the channels), different indices per layer."""
    keep = []
    for i, s in enumerate(layer_shapes(model)):
        groups_total = s["num_kv_heads"]
        count = max(1, groups_total // 2)
        groups = tuple(sorted({(i + k) % groups_total for k in range(count)}))
        channels = tuple(range(i % 2, s["intermediate"] - (s["intermediate"] % 2), 2))
        keep.append(LayerKeep(kv_heads=groups, mlp_channels=channels))
    return keep


def pruned_folder(tmp: Path, case_name: str, homogeneous: bool = False, seed: int = 0) -> tuple[Path, object, object]:
    """(folder, pruned model, tokenizer) of a pruned tiny model of ``case_name`` saved with save_pruned; the
    tokenizer is the folder's, as it reloads (a family's tokenizer class may change its pre-tokenizer)."""
    dense = make_model(CASE_BY_NAME[case_name], seed=seed)
    keep = (homogeneous_keep if homogeneous else heterogeneous_keep)(dense)
    pruned = prune_model(dense, keep)
    folder = save_pruned(pruned, make_tokenizer(), tmp / f"{case_name}-{'homo' if homogeneous else 'hetero'}")
    return folder, pruned, load_pruned(folder)[1]
