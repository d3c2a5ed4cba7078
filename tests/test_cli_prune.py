"""`layerprune prune` through the CLI: a full run on a tiny model, and every bad input -> one line, exit 2,
no output folder."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama
from layerprune.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64


def _char_tokenizer(data_dir: Path):
    """A character-level tokenizer over the 63 most frequent characters of the calibration split."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    text = (data_dir / "valid.txt").read_text()[:200_000]
    chars = [c for c, _ in Counter(text).most_common(VOCAB - 1)]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _save_model(folder: Path, data_dir: Path, poison: bool = False) -> Path:
    model = make_tiny_llama(num_heads=4, num_kv_heads=2, head_dim=8, hidden=32, intermediate=64, layers=3, vocab=VOCAB)
    if poison:
        with torch.no_grad():
            model.model.layers[1].self_attn.k_proj.weight.fill_(float("nan"))
    model.save_pretrained(folder)
    _char_tokenizer(data_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, wikitext_dir) -> Path:
    return _save_model(tmp_path_factory.mktemp("tiny"), wikitext_dir)


def _args(model, out, data_dir, *extra):
    return ["prune", "--model", str(model), "--ratio", "0.2", "--out", str(out), "--data-dir", str(data_dir),
            "--calib-samples", "3", "--calib-seq-len", "24", "--no-progress", *extra]


def test_prune_writes_a_loadable_folder_with_report(tiny_dir, wikitext_dir, tmp_path, capsys, monkeypatch):
    from layerprune.models import load_pruned

    out = tmp_path / "pruned"
    argv = _args(tiny_dir, out, wikitext_dir, "--seed", "3")
    monkeypatch.setattr(sys, "argv", ["layerprune", *argv])
    rc = main(argv)
    printed = capsys.readouterr().out
    assert rc == 0
    assert "actual ratio (all params)" in printed and "params before" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == ["layerprune", *argv]
    assert report["config"]["seed"] == 3 and report["method"] == "unbalanced-reconstruction-dp+lstsq+obs"  # defaults: the best method
    assert abs(report["actual_ratio"] - 0.2) <= report["allocation"]["granule"] / report["params_before"]["total"] + 1e-12
    assert set(report["timings"]) >= {"load", "calibration", "element_scores", "layer_importance", "allocation", "refit",
                                      "pruning"}
    assert len(report["layers"]) == 3 and "mlp_channels_kept" in report["layers"][0]
    assert len(report["layer_importance"]["attn_curves"]) == 3
    loaded = load_pruned(out)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    params = sum(p.numel() for p in model.parameters())
    assert params == report["params_after"]["total"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_uniform_match_params_through_cli(tiny_dir, wikitext_dir, tmp_path):
    out = tmp_path / "uniform"
    assert main(_args(tiny_dir, out, wikitext_dir, "--mode", "uniform", "--match-params")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "uniform-match+lstsq+obs" and report["layer_importance"] is None  # OBS refit by default
    assert abs(report["actual_ratio"] - 0.2) <= report["allocation"]["granule"] / report["params_before"]["total"] + 1e-12


def test_allocation_search_through_cli(tiny_dir, wikitext_dir, tmp_path, capsys):
    from layerprune.report.plots import is_png

    out = tmp_path / "searched"
    argv = _args(tiny_dir, out, wikitext_dir, "--allocation", "search", "--search-generations", "3",
                 "--search-offspring", "3", "--search-samples", "2", "--refit-samples", "6", "--refit-seq-len", "24")
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "unbalanced-reconstruction-dp+search+lstsq+obs"
    search = report["search"]
    assert search["generations"] == 3 and search["fitness"] <= search["seed_fitness"]
    assert search["kept"] in ("search", "solver") and search["final_model_kl"] > 0
    assert is_png(out / "search.png") and oct((out / "search.png").stat().st_mode & 0o777) == oct(
        (out / "report.json").stat().st_mode & 0o777)
    assert "allocation search" in capsys.readouterr().out
    refused = tmp_path / "refused"
    _expect_error(_args(tiny_dir, refused, wikitext_dir, "--allocation", "search", "--sequential"), refused, capsys,
                  "allocation search: runs in memory only")
    _expect_error(_args(tiny_dir, refused, wikitext_dir, "--allocation", "search", "--search-samples", "0"), refused,
                  capsys, "search_samples")


def _expect_error(argv, out, capsys, match, code=2):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    assert not Path(out).exists()
    leftovers = [p for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}")]
    assert not leftovers


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--ratio", "1.5"], "ratio"),
        (["--ratio", "0"], "ratio"),
        (["--layer-end", "9"], "layer_start/end"),
        (["--attn-layer-start", "3"], "attn_layer_start/end"),
        (["--protected", "0,5"], "protected"),
        (["--iterative-steps", "0"], "iterative_steps"),
        (["--ratio", "0.97"], "Infeasible"),
    ],
)
def test_bad_arguments(tiny_dir, wikitext_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    _expect_error(_args(tiny_dir, out, wikitext_dir) + extra, out, capsys, match)


def test_non_llama_and_missing_model(tmp_path, wikitext_dir, capsys):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32).save_pretrained(gpt2)
    out = tmp_path / "out"
    _expect_error(_args(gpt2, out, wikitext_dir), out, capsys, "does not support")
    _expect_error(_args(tmp_path / "nowhere" / "model", out, wikitext_dir), out, capsys, "does not exist")


def test_missing_data_and_busy_output(tiny_dir, tmp_path, wikitext_dir, capsys):
    out = tmp_path / "out"
    _expect_error(_args(tiny_dir, out, tmp_path / "no-data"), out, capsys, "DataError")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    rc = main(_args(tiny_dir, busy, wikitext_dir))
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]


def test_nan_weights_give_a_numerical_error(tmp_path, wikitext_dir, capsys):
    bad = _save_model(tmp_path / "nan", wikitext_dir, poison=True)
    out = tmp_path / "out"
    _expect_error(_args(bad, out, wikitext_dir), out, capsys, "NumericalError")


def test_interrupt_leaves_no_output(tiny_dir, wikitext_dir, tmp_path, capsys, monkeypatch):
    import layerprune.pruning.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "prune", interrupted)
    out = tmp_path / "out"
    _expect_error(_args(tiny_dir, out, wikitext_dir), out, capsys, "interrupted", code=130)


def test_same_command_twice_gives_identical_weights(tiny_dir, wikitext_dir, tmp_path):
    from safetensors.torch import load_file

    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(_args(tiny_dir, out, wikitext_dir, "--seed", "11", "--iterative-steps", "2")) == 0
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((o / "report.json").read_text()) for o in outs)
    assert ra["layers"] == rb["layers"]


@pytest.mark.parametrize("error", [ValueError("boom in the pipeline"), OSError("bad file descriptor"),
                                   "InternalError"], ids=["ValueError", "OSError", "InternalError"])
def test_a_bug_shows_its_traceback(tiny_dir, wikitext_dir, tmp_path, capsys, monkeypatch, error):
    """An internal failure is not dressed up as bad input: traceback, a request to report it, exit 70."""
    import layerprune.pruning.pipeline as pipeline
    from layerprune.errors import InternalError

    raised = InternalError("shapes disagree") if error == "InternalError" else error

    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(pipeline, "prune", broken)
    out = tmp_path / "out"
    assert main(_args(tiny_dir, out, wikitext_dir)) == 70
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert "bug in layerprune" in err.splitlines()[-1]
    assert not out.exists()


def test_a_missing_file_is_one_line(tiny_dir, wikitext_dir, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-calibration.txt"
    _expect_error(_args(tiny_dir, out, wikitext_dir, "--calib-dataset", str(missing)), out, capsys,
                  "no-such-calibration.txt")


@pytest.mark.slow
def test_smollm2_keeps_the_same_heads_and_channels_on_1_and_2_threads(tmp_path, wikitext_dir):
    """`--seed` promises the same model: the scores (torch backward, Rust column sums) must not depend on the
    thread count, or near-tied heads and channels flip."""
    import subprocess

    reports = []
    for threads in (1, 2):
        out = tmp_path / f"t{threads}"
        proc = subprocess.run(
            [sys.executable, "-m", "layerprune", "prune", "--model", "smollm2-135m", "--ratio", "0.2", "--out", str(out),
             "--data-dir", str(wikitext_dir), "--layer-importance", "activation", "--calib-samples", "4",
             "--calib-seq-len", "32", "--threads", str(threads), "--no-progress"],
            capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports.append(json.loads((out / "report.json").read_text()))
    kept = [[(layer["kv_heads_kept"], layer["mlp_channels_kept"]) for layer in r["layers"]] for r in reports]
    assert kept[0] == kept[1]
    assert reports[0]["params_after"] == reports[1]["params_after"]
