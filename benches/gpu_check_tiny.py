"""A tiny random Llama checkpoint with a character-level tokenizer: the stand-in for SmolLM2-135M in the GPU
check's dry run (`GPU_CHECK_DEVICE=cpu bash benches/gpu_check.sh --quick`).

The tokenizer's vocabulary is the most frequent characters of the data folder's `valid.txt` (WikiText-2 raw), so
`layerprune prune` calibrates on real text and `layerprune eval` reads `test.txt` as it does for SmolLM2. The
weights are random (seeded), spread so that heads and channels score differently. Writes a plain Hugging Face
folder (config, model.safetensors, tokenizer) that `layerprune prune --model FOLDER` loads.

    python benches/gpu_check_tiny.py OUT_FOLDER --data-dir DIR [--layers 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

VOCAB = 96
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16}


def char_tokenizer(data_dir: Path, vocab: int = VOCAB):
    """A character-level fast tokenizer over the ``vocab - 1`` most frequent characters of ``valid.txt``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = (data_dir / "valid.txt").read_text(encoding="utf-8")[:400_000]
    chars = [c for c, _ in Counter(text).most_common(vocab - 1)]
    table = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(table, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def tiny_llama(layers: int, vocab: int, seed: int):
    """A random LlamaForCausalLM (float32, eval mode) with the weights spread so that heads differ."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=512,
                         tie_word_embeddings=False, **SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + torch.rand_like(p))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write (must not exist)")
    ap.add_argument("--data-dir", type=Path, required=True, help="WikiText-2 raw folder (valid.txt gives the characters)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.data_dir / "valid.txt").is_file():
        print(f"gpu_check_tiny: no valid.txt in {args.data_dir}", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"gpu_check_tiny: {args.out} exists", file=sys.stderr)
        return 2
    tokenizer = char_tokenizer(args.data_dir)
    model = tiny_llama(args.layers, VOCAB, args.seed)
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"tiny Llama: {args.layers} layers, hidden {SHAPE['hidden_size']}, {SHAPE['num_attention_heads']}/"
          f"{SHAPE['num_key_value_heads']} heads, MLP {SHAPE['intermediate_size']}, {VOCAB} characters -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
