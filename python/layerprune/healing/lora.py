"""LoRA adapters through peft (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*):
W x + (α / r) · B A x on every linear layer of the decoder, merged back into W before the model is saved, so a
healed folder has the pruned architecture and no adapter. The projections' biases (the compensation biases of a
refit among them) train alongside."""

from __future__ import annotations

from typing import Any

import torch

from layerprune.arch import adapter_for
from layerprune.errors import InvalidInputError

INSTALL_HINT = "pip install 'layerprune[heal]' (or: pip install peft)"


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise InvalidInputError(f"--lora needs peft: {INSTALL_HINT}") from None
    return peft


def lora_targets(model: torch.nn.Module) -> list[str]:
    """Full module names of every projection of every decoder layer (what the family's adapter calls them), but
    the zero-width ones of an empty block."""
    adapter = adapter_for(model, "model")
    wanted = {id(module) for layer in adapter.decoder_layers(model) for module in adapter.projections(layer).values()
              if module.weight.numel()}
    return [name for name, module in model.named_modules() if id(module) in wanted]


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float) -> torch.nn.Module:
    """``model`` wrapped by peft with rank-``rank`` adapters on every decoder projection; only the adapters and
    those projections' biases are trainable."""
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="lora_only",
                             target_modules=lora_targets(model), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The base model with the adapters added into its weights (peft's ``merge_and_unload``)."""
    merge = getattr(model, "merge_and_unload", None)
    return model if merge is None else merge()


__all__ = ["INSTALL_HINT", "add_lora", "lora_targets", "merge_lora", "require_peft"]
