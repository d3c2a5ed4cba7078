"""Pruned tiny models of every family, saved as layerprune folders, for the GGUF export tests."""

from __future__ import annotations

from pathlib import Path

from families import CASES, FamilyCase, make_model, make_tokenizer

from layerprune.arch import layer_shapes
from layerprune.export import save_pruned
from layerprune.models import load_pruned
from layerprune.pruning import pruned_copy
from layerprune.scoring.selection import LayerKeep

# Phi-3-mini-4k's layout (MHA, whole-head RoPE, no scaling): the Phi-3 that llama.cpp's llama / deci graphs run
# (CASES' phi3-fused has Phi-4-mini's LongRoPE and partial rotary, which the export refuses)
PHI3_MINI = FamilyCase("phi3-mini", "Phi3Config", "Phi3ForCausalLM",
                       dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0))
# OLMo-2 as published (no attention bias, which llama.cpp's olmo2 loader does not read)
OLMO2 = FamilyCase("olmo2", "Olmo2Config", "Olmo2ForCausalLM",
                   dict(hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0))
CASE_BY_NAME = {c.name: c for c in (*CASES, PHI3_MINI, OLMO2)}


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


def mlp_only_keep(model) -> list[LayerKeep]:
    """Every KV group, half the MLP channels (different ones per layer): the same widths in every layer."""
    return [LayerKeep(kv_heads=tuple(range(s["num_kv_heads"])),
                      mlp_channels=tuple(range(i % 2, s["intermediate"] - (s["intermediate"] % 2), 2)))
            for i, s in enumerate(layer_shapes(model))]


def empty_blocks_keep(model, empty_last: bool = False) -> list[LayerKeep]:
    """Layer 0 without attention, layer 1 without either block, layer 2 without MLP (``empty_last``: layer 1 without
    MLP, layer 2 without either); a block that stays keeps the first half of its KV groups or every third channel."""
    no_attn, no_mlp = ((0, 2), (1, 2)) if empty_last else ((0, 1), (1, 2))
    keep = []
    for i, s in enumerate(layer_shapes(model)):
        kv = () if i in no_attn else tuple(range(max(1, s["num_kv_heads"] // 2)))
        channels = () if i in no_mlp else tuple(range(0, s["intermediate"], 3))
        keep.append(LayerKeep(kv_heads=kv, mlp_channels=channels))
    return keep


KEEPS = {"hetero": heterogeneous_keep, "homo": homogeneous_keep, "mlp": mlp_only_keep, "empty": empty_blocks_keep,
         "empty-last": lambda model: empty_blocks_keep(model, empty_last=True)}


def pruned_folder(tmp: Path, case_name: str, keep: str = "hetero", seed: int = 0) -> tuple[Path, object, object]:
    """(folder, pruned model, tokenizer) of a pruned tiny model of ``case_name`` saved with save_pruned, keeping what
    ``KEEPS[keep]`` chooses; the tokenizer is the folder's, as it reloads (a family's tokenizer class may change its
    pre-tokenizer)."""
    dense = make_model(CASE_BY_NAME[case_name], seed=seed)
    pruned = pruned_copy(dense, KEEPS[keep](dense))
    folder = save_pruned(pruned, make_tokenizer(), tmp / f"{case_name}-{keep}")
    return folder, pruned, load_pruned(folder)[1]


def sentencepiece_tokenizer(text: str, vocab_size: int = 600):
    """A tokenizer laid out as transformers converts Llama 2's SentencePiece model: ``<unk> <s> </s>``, the 256
    byte pieces ``<0x00>``..``<0xFF>``, then BPE pieces over ``▁``-escaped text (byte fallback, a ``▁`` put
    before the text), learned from ``text``."""
    import json

    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def escape():
        return normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])

    learner = Tokenizer(models.BPE())
    learner.normalizer = escape()
    learner.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    learner.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = escape()
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
