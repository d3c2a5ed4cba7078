"""Parameter counts by component and the per-layer shape of a (possibly unevenly pruned) model."""

from __future__ import annotations

from typing import Any

import torch

from layerprune.arch import adapter_for, layer_geometries


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by component; shared (tied) tensors are counted once, so the parts sum to `total`.

    Keys: total, embeddings, attention, mlp, norms, lm_head (0 when tied to the embeddings),
    other, decoder_layers (everything inside ``model.layers``).
    """
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head", "other", "decoder_layers"), 0)
    for name, param in model.named_parameters():  # named_parameters() yields a shared tensor once
        n = param.numel()
        parts = name.split(".")
        if "embed_tokens" in parts or "wte" in parts or "embed_positions" in parts:
            counts["embeddings"] += n
        elif "lm_head" in parts:
            counts["lm_head"] += n
        elif "self_attn" in parts or "attn" in parts:
            counts["attention"] += n
        elif "mlp" in parts:
            counts["mlp"] += n
        elif any("norm" in p for p in parts):
            counts["norms"] += n
        else:
            counts["other"] += n
        if "layers" in parts:
            counts["decoder_layers"] += n
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def model_info(model: Any) -> dict[str, Any]:
    """Shape of a (possibly non-uniformly pruned) model, read from its modules.

    Per-layer lists: ``heads`` (query heads), ``kv_heads``, ``intermediate`` (MLP channels).
    """
    adapter = adapter_for(model)
    geometries = layer_geometries(model)
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    return {
        "architecture": type(model).__name__,
        "family": adapter.name,
        "layers": len(geometries),
        "hidden": int(model.config.hidden_size),
        "head_dim": geometries[0].head_dim if geometries else None,
        "heads": [g.num_q_heads for g in geometries],
        "kv_heads": [g.num_kv_heads for g in geometries],
        "intermediate": [g.intermediate for g in geometries],
        "vocab": int(embeddings.shape[0]),
        "tied_embeddings": head is not None and head.weight is embeddings,
    }


__all__ = ["count_parameters", "model_info"]
