"""Export: pruned models written as folders that reload through transformers (remote code), whole or layer by
layer (``prune_checkpoint``: a checkpoint larger than memory pruned straight into a folder)."""

from layerprune.export.save import MODELING_FILE, save_pruned
from layerprune.export.streamed import PrunedFolderWriter, SafetensorsShardWriter, prune_checkpoint

__all__ = ["MODELING_FILE", "PrunedFolderWriter", "SafetensorsShardWriter", "prune_checkpoint", "save_pruned"]
