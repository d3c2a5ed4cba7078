"""WikiText-2 (raw) and plain text files as rows, text and token tensors.

Row rule (the Hugging Face ``wikitext-2-raw-v1`` convention, which LLM-Pruner's evaluator
reads): one line of the raw file is one row; a row keeps its trailing ``"\\n"``; a line that is
only whitespace (WikiText's blank lines are ``" \\n"``) becomes the empty row ``""``. So the raw
``test.txt`` and ``datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='test')`` give
the same 4,358 rows, and the same tokens after joining.

Evaluation text is the rows joined with ``"\\n\\n"`` and tokenized once with the tokenizer's
defaults (LLM-Pruner's PPL protocol). Calibration text comes from the train split when present,
else from the validation split, never from test.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from layerprune.errors import DataError, InvalidInputError

WIKITEXT2 = "wikitext2"
DATA_DIR_ENV = "LAYERPRUNE_DATA_DIR"
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
SPLIT_ALIASES = {"validation": "valid", "val": "valid"}
HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

_HOW_TO_PROVIDE = (
    f"pass --data-dir DIR or set {DATA_DIR_ENV}=DIR (a folder with WikiText-2 raw test.txt and valid.txt, "
    "optional train.txt), or install the `datasets` library with access to the Hugging Face hub"
)


def rows_from_lines(lines: Any) -> list[str]:
    """Apply the row rule to an iterable of lines that keep their ``"\\n"``."""
    return [line if line.strip() else "" for line in lines]


# Calibration and healing read at most this many characters of a .txt file (a few million tokens, far more than
# either uses): a file far larger than memory, or a pipe that never ends, is streamed up to here, never read whole.
CALIBRATION_TEXT_CHARS = 64 * 2**20
_LINE_CHARS = 2**20  # one read: a file without newlines is taken in rows of at most this many characters


def read_rows(path: str | os.PathLike[str], max_chars: int | None = None) -> list[str]:
    """Rows of one text file (UTF-8, Python's universal newlines, like the HF loader), streamed: at most
    ``max_chars`` characters are read (None: the whole file). A NUL character means a binary file: DataError."""
    rows: list[str] = []
    read = 0
    try:
        with open(path, encoding="utf-8") as handle:
            while max_chars is None or read < max_chars:
                line = handle.readline(_LINE_CHARS)
                if not line:
                    break
                if "\x00" in line:
                    raise DataError(f"{path} is not text (a NUL character near character {read + line.index(chr(0)):,})")
                read += len(line)
                rows.append(line if line.strip() else "")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return rows


def normalize_split(split: str) -> str:
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLIT_FILES:
        raise InvalidInputError(f"split must be one of {', '.join(SPLIT_FILES)}; got '{split}'")
    return split


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """`data_dir`, else ``$LAYERPRUNE_DATA_DIR``, else None (then the `datasets` library is tried)."""
    if data_dir is not None and os.fspath(data_dir) != "":
        source, path = "--data-dir", Path(data_dir).expanduser()
    elif os.environ.get(DATA_DIR_ENV):
        source, path = DATA_DIR_ENV, Path(os.environ[DATA_DIR_ENV]).expanduser()
    else:
        return None
    if not path.is_dir():
        raise DataError(f"{source} {path} is not a folder; {_HOW_TO_PROVIDE}")
    return path


def is_text_file_dataset(dataset: str) -> bool:
    return os.fspath(dataset).endswith(".txt")


def _rows_from_hub(split: str) -> list[str]:
    try:
        import datasets  # optional dependency
    except ImportError:
        raise DataError(f"WikiText-2 not found: {_HOW_TO_PROVIDE}") from None
    try:
        loaded = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=HF_SPLITS[split])
    except Exception as exc:  # network and hub errors come in many types
        raise DataError(
            f"WikiText-2 not found ({type(exc).__name__} from the datasets library); {_HOW_TO_PROVIDE}"
        ) from None
    return list(loaded["text"])


def load_rows(dataset: str, split: str, data_dir: str | os.PathLike[str] | None = None,
              max_chars: int | None = None) -> list[str]:
    """Rows of `dataset` ('wikitext2' or a path to a .txt file, whose `split` is ignored; at most ``max_chars``
    characters of it are read, :func:`read_rows`)."""
    dataset = os.fspath(dataset)
    if is_text_file_dataset(dataset):
        path = Path(dataset).expanduser()
        if not path.exists() or path.is_dir():
            raise DataError(f"dataset {path} does not exist")
        return read_rows(path, max_chars)
    if dataset.lower() != WIKITEXT2:
        raise DataError(f"unknown --dataset '{dataset}': use 'wikitext2' or a path to a .txt file")
    split = normalize_split(split)
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return _rows_from_hub(split)
    path = folder / SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"WikiText-2 {split} split not found: {path} does not exist; {_HOW_TO_PROVIDE}")
    return read_rows(path)


def calibration_split(data_dir: str | os.PathLike[str] | None = None, dataset: str = WIKITEXT2) -> str | None:
    """'train' when the train split is available, else 'valid'; never 'test'. None for a text file (read whole)."""
    if is_text_file_dataset(dataset):
        return None
    folder = resolve_data_dir(data_dir)
    if folder is None:
        return "train"  # the datasets library always has it
    if (folder / SPLIT_FILES["train"]).is_file():
        return "train"
    if (folder / SPLIT_FILES["valid"]).is_file():
        return "valid"
    raise DataError(
        f"no calibration split in {folder}: need train.txt or valid.txt (test.txt is never used for calibration)"
    )


def load_text(dataset: str, split: str, data_dir: str | os.PathLike[str] | None = None,
              max_chars: int | None = None) -> str:
    """The rows joined with ``"\\n\\n"`` (LLM-Pruner's PPL text)."""
    return "\n\n".join(load_rows(dataset, split, data_dir, max_chars))


# tokenizers' default word-cache size for BPE and Unigram models (tokenizers/src/models/bpe/model.rs).
TOKENIZERS_CACHE_CAPACITY = 10_000
_caches_off: set[int] = set()


@contextlib.contextmanager
def word_cache_off(tokenizer: Any) -> Iterator[None]:
    """Turn the tokenizers word cache of a fast tokenizer off for the duration, then back on at its default size.

    Every fresh tokenizer that fills its BPE cache on a long text leaves native memory behind after it is freed
    (~4 MiB a tokenizer on WikiText-2 test with SmolLM2's; huggingface/tokenizers#1539). The cache only memoises
    word → tokens, so the ids are the same without it, ~10% slower. Slow tokenizers, and models without a cache
    (WordPiece, WordLevel), are left as they are. Nested uses are free.
    """
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    resize = getattr(model, "_resize_cache", None)
    if resize is None or id(model) in _caches_off:
        yield
        return
    _caches_off.add(id(model))
    resize(0)
    try:
        yield
    finally:
        resize(TOKENIZERS_CACHE_CAPACITY)
        _caches_off.discard(id(model))


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """``tokenizer(text, return_tensors='pt').input_ids[0]`` with the tokenizer's default special tokens, its word
    cache off (`word_cache_off`)."""
    import logging

    # The "sequence longer than model max length" notice does not apply: the text is windowed later.
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with word_cache_off(tokenizer):
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        logger.setLevel(level)
    return ids.to(torch.long)


def eval_tokens(
    tokenizer: Any,
    dataset: str = WIKITEXT2,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "test",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """The evaluation split as one 1-D LongTensor, truncated to the first `max_tokens` tokens."""
    if max_tokens is not None and max_tokens < 1:
        raise InvalidInputError(f"--max-tokens must be positive; got {max_tokens}")
    ids = tokenize_text(tokenizer, load_text(dataset, split, data_dir))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids


def calibration_batch(
    tokenizer: Any,
    n_samples: int = 10,
    seq_len: int = 64,
    seed: int = 0,
    dataset: str = WIKITEXT2,
    data_dir: str | os.PathLike[str] | None = None,
) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens from the calibration split, shape [n_samples, seq_len].

    Follows LLM-Pruner's ``get_examples``: visit rows in a seeded random order, tokenize each row
    on its own, keep rows with at least `seq_len` tokens (each row at most once), and cut one
    window at a seeded random offset from each.
    """
    if n_samples < 1:
        raise InvalidInputError(f"calibration samples must be positive; got {n_samples}")
    if seq_len < 2:
        raise InvalidInputError(f"calibration seq_len must be at least 2; got {seq_len}")
    split = calibration_split(data_dir, dataset)
    assert split != "test", "calibration must never read the test split"
    rows = load_rows(dataset, split or "", data_dir, CALIBRATION_TEXT_CHARS)
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    windows: list[torch.Tensor] = []
    with word_cache_off(tokenizer):  # once for all rows, not per row
        for index in order:
            if not rows[index]:
                continue
            ids = tokenize_text(tokenizer, rows[index])
            if ids.numel() < seq_len:
                continue
            start = rng.randint(0, ids.numel() - seq_len)
            windows.append(ids[start : start + seq_len])
            if len(windows) == n_samples:
                return torch.stack(windows)
    where = f"the {dataset} {split} split" if split else str(dataset)
    raise DataError(
        f"only {len(windows)} rows of {where} have at least {seq_len} tokens; "
        f"{n_samples} calibration samples were requested (lower the sample count or the sequence length)"
    )


def text_source(dataset: str, split: str | None, data_dir: str | os.PathLike[str] | None = None,
                max_chars: int | None = None) -> dict[str, Any]:
    """Exactly which text a dataset and split name: its file (or the `datasets` split), and the sha256 of its rows.

    ``{"dataset", "split", "file", "sha256", "rows"}``; ``split`` is None for a text file (read whole).
    """
    dataset = os.fspath(dataset)
    if is_text_file_dataset(dataset):
        split, file = None, str(Path(dataset).expanduser().resolve())
    else:
        split = normalize_split(split or "")
        folder = resolve_data_dir(data_dir)
        file = str((folder / SPLIT_FILES[split]).resolve()) if folder is not None else f"datasets:wikitext-2-raw-v1/{HF_SPLITS[split]}"
    rows = load_rows(dataset, split or "", data_dir, max_chars)
    digest = hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()
    return {"dataset": dataset, "split": split, "file": file, "sha256": digest, "rows": len(rows)}


def calibration_source(dataset: str = WIKITEXT2, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """:func:`text_source` of the calibration text of `dataset` (train, else valid; a text file whole)."""
    return text_source(dataset, calibration_split(data_dir, dataset), data_dir, CALIBRATION_TEXT_CHARS)


def check_disjoint(calibration: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """Refuse to calibrate on the text that is evaluated (the same file, or the same rows under another name)."""
    if calibration["file"] == evaluation["file"] or calibration["sha256"] == evaluation["sha256"]:
        raise DataError(
            f"calibration text {calibration['file']} is the evaluated text {evaluation['file']}: pass a different "
            "--calib-dataset (the default, wikitext2, calibrates on its train or valid split)"
        )


__all__ = [
    "CALIBRATION_TEXT_CHARS",
    "DATA_DIR_ENV",
    "WIKITEXT2",
    "calibration_batch",
    "calibration_source",
    "calibration_split",
    "check_disjoint",
    "eval_tokens",
    "load_rows",
    "load_text",
    "read_rows",
    "resolve_data_dir",
    "rows_from_lines",
    "text_source",
]
