"""A full disk, met as a file-size limit (RLIMIT_FSIZE, `ulimit -f`) that a save passes partway.

Each command ends with one error line that names the disk, exit code 2, no traceback; no output is left
half-written (no folder, no file, nothing beside them) and the input is unchanged.
"""

from __future__ import annotations

import json

import pytest
from faults.harness import digest, leftovers

LIMIT = 64 * 1024  # bytes: the tiny model's weights are ~300 kB, every small file fits
CALIB = ["--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"]


def _expect_disk_error(result):
    assert result["exit"] == 2, result["log"][-3000:]
    assert len(result["error_lines"]) == 1, result["log"][-3000:]
    assert "the disk or the file-size limit is full" in result["error_lines"][0]
    assert "Traceback" not in result["log"]


@pytest.mark.parametrize("flags", [[], ["--sequential"]], ids=["memory", "layers"])
def test_prune_on_a_full_disk(runner, checkpoint, tmp_path, flags):
    before = digest(checkpoint)
    out = tmp_path / "out"
    result = runner.one(["prune", "--model", checkpoint, "--ratio", "0.25", "--out", out, *CALIB, *flags],
                        fsize=LIMIT)
    _expect_disk_error(result)
    assert not out.exists() and leftovers(out) == []
    assert digest(checkpoint) == before


def test_export_on_a_full_disk(runner, checkpoint, tmp_path):
    before = digest(checkpoint)
    out = tmp_path / "model.gguf"
    _expect_disk_error(runner.one(["export", "--model", checkpoint, "--out", out, "--no-progress"], fsize=LIMIT))
    assert list(tmp_path.iterdir()) == []
    assert digest(checkpoint) == before


def test_compare_on_a_full_disk_keeps_only_whole_runs(runner, checkpoint, tmp_path):
    before = digest(checkpoint)
    out = tmp_path / "compare"
    argv = ["compare", "--model", checkpoint, "--out", out, "--ratio", "0.25", "--methods", "dense,uniform",
            "--max-tokens", "512", "--no-generate", *CALIB]
    _expect_disk_error(runner.one(argv, fsize=LIMIT))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in out.rglob(".*")]  # no temporary file or folder left inside
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())  # every stored file is whole
    assert not (out / "models").exists() or not any((out / "models").rglob("model.safetensors"))
    assert digest(checkpoint) == before
    # with room again, the same command finishes, reusing what was stored whole
    assert runner.one(argv)["exit"] == 0


def test_heal_on_a_full_disk(runner, checkpoint, tmp_path):
    before = digest(checkpoint)
    out = tmp_path / "healed"
    result = runner.one(["heal", "--model", checkpoint, "--teacher", checkpoint, "--out", out, "--tokens", "1024",
                         "--seq-len", "32", "--batch-size", "4", "--no-progress"], fsize=LIMIT)
    _expect_disk_error(result)
    assert not out.exists()
    assert digest(checkpoint) == before
