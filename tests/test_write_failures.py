"""A full disk and an output folder inside the input are the user's to fix: one error line, exit 2, nothing written."""

from __future__ import annotations

import errno

import pytest
from families import CASES, make_model, make_tokenizer

from layerprune.cli import failure, main
from layerprune.export import save, save_pruned


def _full_disk(tensors, path, metadata=None):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")


def test_a_full_disk_in_safetensors_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors raises SafetensorError (not an OSError) when a write fails; it reaches the user as the OSError
    it is, and the output folder is absent."""
    model, tokenizer = make_model(CASES[0]), make_tokenizer()  # transformers imported before the patch
    monkeypatch.setattr("safetensors.torch.save_file", _full_disk)
    with pytest.raises(OSError) as caught:
        save_pruned(model, tokenizer, tmp_path / "out")
    assert caught.value.errno == errno.EFBIG and caught.value.filename.endswith(save.WEIGHTS_FILE)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    code, line = failure("prune", caught.value)
    assert code == 2 and line.startswith("layerprune prune: error:") and "file-size limit is full" in line


def test_a_safetensors_error_that_is_not_io_stays_a_bug(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def broken(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: some internal inconsistency")

    model, tokenizer = make_model(CASES[0]), make_tokenizer()
    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(SafetensorError):
        save_pruned(model, tokenizer, tmp_path / "out")


@pytest.mark.parametrize("inside", ["", "sub"])
def test_out_in_the_input_folder_is_refused(tmp_path, capsys, inside):
    model = tmp_path / "dense"
    make_model(CASES[0]).save_pretrained(model)
    before = sorted((p.name, p.stat().st_size) for p in model.iterdir())
    out = model / inside if inside else model
    capsys.readouterr()  # transformers' own save output
    assert main(["prune", "--model", str(model), "--ratio", "0.2", "--out", str(out), "--overwrite",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inside the input model's folder" in err, err
    assert sorted((p.name, p.stat().st_size) for p in model.iterdir()) == before
