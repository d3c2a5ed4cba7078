"""Export: pruned models written as folders that reload through transformers (remote code, or the family's own
config when every layer has the same widths), whole or layer by layer (``prune_checkpoint``: a checkpoint larger
than memory pruned straight into a folder), and as GGUF files for llama.cpp (``export_gguf``, ``write_gguf``)."""

from layerprune.export.gguf import export_gguf, write_gguf
from layerprune.export.save import MODELING_FILE, save_pruned
from layerprune.export.streamed import PrunedFolderWriter, SafetensorsShardWriter, prune_checkpoint

__all__ = ["MODELING_FILE", "PrunedFolderWriter", "SafetensorsShardWriter", "export_gguf", "prune_checkpoint",
           "save_pruned", "write_gguf"]
