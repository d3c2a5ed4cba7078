"""WikiText-2 rows, evaluation tokens and calibration windows (layerprune.data)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from layerprune import data
from layerprune.data import wikitext
from layerprune.errors import DataError, InvalidInputError


class CharTokenizer:
    """One token per character (its code point): windows decode to exact substrings of the text."""

    eos_token_id = None

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[ord(c) for c in text]], dtype=torch.long)
        return types.SimpleNamespace(input_ids=ids)

    @staticmethod
    def decode(ids):
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from layerprune.models import ensure_embedded_model

    return AutoTokenizer.from_pretrained(ensure_embedded_model())


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


def test_wikitext_rows_follow_the_datasets_convention(wikitext_dir, no_env):
    rows = data.load_rows("wikitext2", "test", wikitext_dir)
    raw_lines = (wikitext_dir / "test.txt").read_text(encoding="utf-8").split("\n")
    assert raw_lines[-1] == ""  # the file ends with a newline
    assert len(rows) == len(raw_lines) - 1 == 4358
    # Known rows of Salesforce/wikitext wikitext-2-raw-v1 'test'.
    assert rows[0] == ""
    assert rows[1] == " = Robert Boulter = \n"
    assert rows[2] == ""
    assert rows[3].startswith(" Robert Boulter is an English film , television and theatre actor .")
    assert rows[3].endswith(" \n")
    # Blank " \n" lines become "", every other row is the line with its newline.
    assert rows.count("") == 1467
    for row, line in zip(rows, raw_lines):
        assert row == ("" if line.strip() == "" else line + "\n")
    valid = data.load_rows("wikitext2", "validation", wikitext_dir)
    assert len(valid) == 3760 and valid[1] == " = Homarus gammarus = \n"


def test_load_text_joins_rows_with_blank_lines(wikitext_dir, no_env):
    text = data.load_text("wikitext2", "test", wikitext_dir)
    # "" + "\n\n" + " = Robert Boulter = \n" + "\n\n" + "" + "\n\n" + " Robert ..."
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    rows = data.load_rows("wikitext2", "test", wikitext_dir)
    assert text == "\n\n".join(rows)


def test_env_variable_is_used_when_no_flag(wikitext_dir, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(wikitext_dir))
    assert data.load_rows("wikitext2", "valid")[1] == " = Homarus gammarus = \n"


def test_datasets_library_is_the_fallback(wikitext_dir, monkeypatch, no_env):
    calls = []
    file_rows = data.load_rows("wikitext2", "test", wikitext_dir)

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": list(file_rows)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert data.load_rows("wikitext2", "test") == file_rows
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test")]


def test_missing_data_names_the_flag_and_variable(tmp_path, monkeypatch, no_env):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="--data-dir") as info:
        data.load_rows("wikitext2", "test")
    assert data.DATA_DIR_ENV in str(info.value)

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(DataError, match=data.DATA_DIR_ENV):
        data.load_rows("wikitext2", "test")
    with pytest.raises(DataError, match="test.txt does not exist"):
        data.load_rows("wikitext2", "test", tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        data.load_rows("wikitext2", "test", tmp_path / "missing")
    with pytest.raises(DataError, match="unknown --dataset"):
        data.load_rows("ptb", "test", tmp_path)
    with pytest.raises(InvalidInputError, match="split"):
        data.load_rows("wikitext2", "dev", tmp_path)


def test_text_file_dataset(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(" first line \n   \n\nsecond\nlast without newline", encoding="utf-8")
    rows = data.load_rows(str(path), "ignored")
    assert rows == [" first line \n", "", "", "second\n", "last without newline"]
    with pytest.raises(DataError, match="does not exist"):
        data.load_rows(str(tmp_path / "absent.txt"), "test")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        data.load_rows(str(tmp_path / "binary.txt"), "test")


def test_eval_tokens_match_llm_pruner_tokenization(wikitext_dir, smollm2_tokenizer, no_env):
    tokens = data.eval_tokens(smollm2_tokenizer, "wikitext2", wikitext_dir, max_tokens=2048)
    text = "\n\n".join(data.load_rows("wikitext2", "test", wikitext_dir))
    reference = smollm2_tokenizer(text, return_tensors="pt").input_ids[0]  # with the word cache on
    assert tokens.dtype == torch.long and tokens.dim() == 1
    assert torch.equal(tokens, reference[:2048])
    # the whole split, tokenized with the word cache off, is the same stream
    assert torch.equal(data.eval_tokens(smollm2_tokenizer, "wikitext2", wikitext_dir), reference)
    # SmolLM2's tokenizer adds no BOS by default, so the stream starts with the text itself.
    assert smollm2_tokenizer.decode(tokens[:8]).startswith("\n\n = Robert Boulter")
    with pytest.raises(InvalidInputError, match="max-tokens"):
        data.eval_tokens(smollm2_tokenizer, "wikitext2", wikitext_dir, max_tokens=0)


def _spy_splits(monkeypatch):
    seen = []
    original = data.load_rows

    def spy(dataset, split, data_dir=None, max_chars=None):
        seen.append(split)
        return original(dataset, split, data_dir, max_chars)

    monkeypatch.setattr(wikitext, "load_rows", spy)
    return seen


def test_calibration_reads_valid_never_test(wikitext_dir, monkeypatch, no_env):
    seen = _spy_splits(monkeypatch)
    tokenizer = CharTokenizer()
    batch = data.calibration_batch(tokenizer, n_samples=6, seq_len=64, seed=3, data_dir=wikitext_dir)
    assert seen == ["valid"]
    assert batch.shape == (6, 64) and batch.dtype == torch.long
    valid_text = (wikitext_dir / "valid.txt").read_text(encoding="utf-8")
    test_text = (wikitext_dir / "test.txt").read_text(encoding="utf-8")
    for window in batch:
        piece = tokenizer.decode(window)
        assert piece in valid_text
        assert piece not in test_text
    assert len({tokenizer.decode(w) for w in batch}) == 6
    again = data.calibration_batch(tokenizer, n_samples=6, seq_len=64, seed=3, data_dir=wikitext_dir)
    other = data.calibration_batch(tokenizer, n_samples=6, seq_len=64, seed=4, data_dir=wikitext_dir)
    assert torch.equal(batch, again)
    assert not torch.equal(batch, other)


def test_calibration_prefers_train_and_refuses_test_only(tmp_path, wikitext_dir, monkeypatch, no_env):
    folder = tmp_path / "wt"
    folder.mkdir()
    (folder / "test.txt").write_text((wikitext_dir / "test.txt").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(DataError, match="never used for calibration"):
        data.calibration_batch(CharTokenizer(), n_samples=2, seq_len=16, data_dir=folder)
    (folder / "train.txt").write_text(" = Train = \n \n" + " alpha beta gamma delta epsilon zeta eta theta \n" * 3)
    (folder / "valid.txt").write_text(" = Valid = \n")
    seen = _spy_splits(monkeypatch)
    assert data.calibration_split(folder) == "train"
    batch = data.calibration_batch(CharTokenizer(), n_samples=3, seq_len=16, data_dir=folder)
    assert seen == ["train"] and batch.shape == (3, 16)
    with pytest.raises(DataError, match="at least 200 tokens"):
        data.calibration_batch(CharTokenizer(), n_samples=3, seq_len=200, data_dir=folder)
    with pytest.raises(InvalidInputError):
        data.calibration_batch(CharTokenizer(), n_samples=0, seq_len=16, data_dir=folder)


def test_calibration_from_text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("".join(f" line {i} with some words in it \n" for i in range(20)))
    batch = data.calibration_batch(CharTokenizer(), n_samples=4, seq_len=12, dataset=str(path))
    text = path.read_text()
    assert batch.shape == (4, 12)
    assert all(CharTokenizer.decode(w) in text for w in batch)


def test_resolve_data_dir_accepts_paths(wikitext_dir, no_env):
    assert data.resolve_data_dir(str(wikitext_dir)) == Path(wikitext_dir)
    assert data.resolve_data_dir(None) is None
