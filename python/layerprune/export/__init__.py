"""Export: pruned models written as folders that reload through transformers (remote code)."""

from layerprune.export.save import MODELING_FILE, save_pruned

__all__ = ["MODELING_FILE", "save_pruned"]
