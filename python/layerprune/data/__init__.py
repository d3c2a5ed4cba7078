"""Data: WikiText-2 (raw) and plain text files as rows, evaluation tokens and calibration batches."""

from layerprune.data.wikitext import (
    DATA_DIR_ENV,
    HF_SPLITS,
    SPLIT_FILES,
    WIKITEXT2,
    calibration_batch,
    calibration_split,
    eval_tokens,
    is_text_file_dataset,
    load_rows,
    load_text,
    normalize_split,
    read_rows,
    resolve_data_dir,
    rows_from_lines,
    tokenize_text,
)

__all__ = [
    "DATA_DIR_ENV",
    "HF_SPLITS",
    "SPLIT_FILES",
    "WIKITEXT2",
    "calibration_batch",
    "calibration_split",
    "eval_tokens",
    "is_text_file_dataset",
    "load_rows",
    "load_text",
    "normalize_split",
    "read_rows",
    "resolve_data_dir",
    "rows_from_lines",
    "tokenize_text",
]
