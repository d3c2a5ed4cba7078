"""The healing text: the calibration split (or a text file) tokenized once, packed into sequences, and a
held-out slice kept aside for validation. The evaluated (test) text is never read for training."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from layerprune.data import (
    WIKITEXT2,
    calibration_source,
    calibration_split,
    check_disjoint,
    is_text_file_dataset,
    load_text,
    resolve_data_dir,
    text_source,
    tokenize_text,
)
from layerprune.data.wikitext import CALIBRATION_TEXT_CHARS, SPLIT_FILES
from layerprune.errors import DataError


@dataclass(frozen=True)
class HealText:
    """``train`` [n, seq_len] and ``held_out`` [m, seq_len] token ids, and which text they came from."""

    train: torch.Tensor
    held_out: torch.Tensor
    source: dict[str, Any]


def check_not_evaluated(source: dict[str, Any], data_dir: str | os.PathLike[str] | None) -> None:
    """Refuse healing text that is WikiText-2's test split (the evaluated text), under any name."""
    folder = resolve_data_dir(data_dir)
    if folder is not None and (folder / SPLIT_FILES["test"]).is_file():
        check_disjoint(source, text_source(WIKITEXT2, "test", data_dir))


def heal_text(
    tokenizer: Any,
    seq_len: int,
    held_out_fraction: float,
    dataset: str = WIKITEXT2,
    data_dir: str | os.PathLike[str] | None = None,
) -> HealText:
    """Tokenize the calibration text whole (rows joined by blank lines), cut it into consecutive sequences of
    ``seq_len`` tokens, and keep the last ``held_out_fraction`` of them (at least one) for validation: a
    contiguous tail, so no held-out window shares text with a training window."""
    source = calibration_source(dataset, data_dir)
    check_not_evaluated(source, data_dir)
    split = calibration_split(data_dir, dataset)
    ids = tokenize_text(tokenizer, load_text(dataset, split or "", data_dir, CALIBRATION_TEXT_CHARS))
    n = ids.numel() // seq_len
    held = max(1, int(round(n * held_out_fraction)))
    if n - held < 1:
        where = dataset if is_text_file_dataset(dataset) else f"the {dataset} {split} split"
        raise DataError(f"{where} has {ids.numel()} tokens: too few for one training and one held-out sequence of "
                        f"--seq-len {seq_len}")
    sequences = ids[: n * seq_len].view(n, seq_len)
    return HealText(sequences[: n - held].clone(), sequences[n - held :].clone(), source)


__all__ = ["HealText", "check_not_evaluated", "heal_text"]
