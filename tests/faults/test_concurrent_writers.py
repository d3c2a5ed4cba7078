"""Two commands writing one --out, started together: exactly one whole folder results, never a mixture. The one
that claims --out first runs; the other exits at once in one line. And --out in an input's folder is refused."""

from __future__ import annotations

import pytest
from faults.harness import RESULT_FILES, digest, leftovers

CALIB = ["--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"]


def _prune(model, out, ratio, *extra):
    return {"argv": [str(a) for a in ["prune", "--model", model, "--ratio", ratio, "--out", out, *CALIB, *extra]]}


@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["fresh", "overwrite"])
def test_two_prunes_into_one_out(runner, checkpoint, tmp_path, flags):
    before = digest(checkpoint)
    refs = {}
    for ratio in ("0.2", "0.4"):
        ref = tmp_path / f"ref-{ratio}"
        assert runner.run(_prune(checkpoint, ref, ratio))[0]["exit"] == 0
        refs[ratio] = digest(ref, RESULT_FILES)
    out = tmp_path / "out"
    first, second = runner.run(_prune(checkpoint, out, "0.2", *flags), _prune(checkpoint, out, "0.4", *flags))
    codes = sorted([first["exit"], second["exit"]])
    assert codes == [0, 2], (first["log"][-2000:], second["log"][-2000:])
    loser = first if first["exit"] == 2 else second
    assert len(loser["error_lines"]) == 1 and "being written by another layerprune process" in loser["error_lines"][0]
    winner_ratio = "0.2" if first["exit"] == 0 else "0.4"
    assert digest(out, RESULT_FILES) == refs[winner_ratio]  # one run's folder, whole
    assert leftovers(out) == [] and digest(checkpoint) == before


def test_a_second_command_after_the_first_finished_is_refused_without_overwrite(runner, checkpoint, tmp_path):
    out = tmp_path / "out"
    assert runner.run(_prune(checkpoint, out, "0.2"))[0]["exit"] == 0
    kept = digest(out)
    late = runner.run(_prune(checkpoint, out, "0.4"))[0]
    assert late["exit"] == 2 and "--overwrite" in late["error_lines"][0]
    assert digest(out) == kept


def test_export_and_compare_claim_their_out(runner, checkpoint, tmp_path):
    gguf = tmp_path / "model.gguf"
    export = {"argv": [str(a) for a in ["export", "--model", checkpoint, "--out", gguf, "--no-progress"]]}
    a, b = runner.run(export, export)
    assert sorted([a["exit"], b["exit"]]) == [0, 2], (a["log"][-2000:], b["log"][-2000:])
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    out = tmp_path / "compare"
    compare = {"argv": [str(a) for a in ["compare", "--model", checkpoint, "--out", out, "--ratio", "0.25",
                                         "--methods", "dense,uniform", "--max-tokens", "512", "--no-generate",
                                         *CALIB]]}
    a, b = runner.run(compare, compare)
    assert sorted([a["exit"], b["exit"]]) == [0, 2], (a["log"][-2000:], b["log"][-2000:])


@pytest.mark.parametrize("command", ["prune", "heal", "compare", "export"])
@pytest.mark.parametrize("inside", ["", "sub"])
def test_out_in_the_input_folder_is_refused(runner, checkpoint, command, inside):
    before = digest(checkpoint)
    out = checkpoint / inside if inside else checkpoint
    if command == "export":  # a file: in the input's folder, or in a folder inside it
        out = out / "model.gguf"
    extra = {"prune": ["--ratio", "0.2", "--overwrite"], "heal": ["--teacher", checkpoint, "--overwrite"],
             "compare": ["--ratio", "0.2"], "export": ["--overwrite"]}[command]
    result = runner.one([command, "--model", checkpoint, "--out", out, *extra, "--no-progress"])
    assert result["exit"] == 2 and len(result["error_lines"]) == 1, result["log"][-2000:]
    assert "inside the input model's folder" in result["error_lines"][0]
    assert digest(checkpoint) == before and sorted(p.name for p in checkpoint.parent.iterdir()) == ["tiny"]
