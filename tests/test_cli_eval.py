"""`layerprune eval`: output, JSON, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from layerprune import cli, data, models
from layerprune.evaluation import perplexity

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (so real text tokenizes into its vocabulary)."""
    from transformers import AutoTokenizer

    from conftest import make_tiny_llama

    tokenizer = AutoTokenizer.from_pretrained(models.ensure_embedded_model())
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(vocab=len(tokenizer), hidden=32, num_heads=4, num_kv_heads=2, layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path, wikitext_dir):
    """The first 60 rows of WikiText-2 valid as a .txt dataset (a few thousand tokens)."""
    lines = (wikitext_dir / "valid.txt").read_text(encoding="utf-8").split("\n")[:60]
    path = tmp_path / "sample.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if a test that should stop at argument checks reaches the model load."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


def _run(capsys, *argv):
    capsys.readouterr()  # drop what the test's own set-up printed
    code = cli.main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error_line(code, err, *needles):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("layerprune eval: error:")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_json_to_stdout_is_pure_json(capsys, tiny_model_dir, text_file):
    code, out, err = _run(
        capsys, "--model", tiny_model_dir, "--dataset", text_file, "--seq-len", 32, "--max-tokens", 200,
        "--batch-size", 2, "--json", "-", "--no-progress",
    )
    assert code == 0, err
    result = json.loads(out)
    assert "perplexity:" in err and "parameters:" in err
    for key in ("ppl", "tokens", "seq_len", "params", "dataset", "model", "split", "max_tokens",
                "predicted_tokens", "seconds"):
        assert key in result
    assert (result["tokens"], result["predicted_tokens"], result["seq_len"]) == (192, 6 * 31, 32)
    assert result["max_tokens"] == 200 and result["dataset"] == str(text_file)
    model, tokenizer = models.load_model(tiny_model_dir)
    assert result["params"]["total"] == sum(p.numel() for p in model.parameters())
    tokens = data.eval_tokens(tokenizer, str(text_file), max_tokens=200)
    expected = perplexity(model, tokens, seq_len=32, progress=False)
    assert result["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)


def test_human_output_and_json_file(capsys, tiny_model_dir, wikitext_dir, tmp_path):
    out_file = tmp_path / "result.json"
    code, out, err = _run(
        capsys, "--model", tiny_model_dir, "--dataset", "wikitext2", "--data-dir", wikitext_dir,
        "--seq-len", 64, "--max-tokens", 256, "--dtype", "bfloat16", "--json", out_file, "--no-progress",
    )
    assert code == 0, err
    assert "lm_head" in out  # the tiny model is untied, so lm_head is listed
    assert "wikitext2 test: 256 tokens in 4 windows of 64 (252 predicted)" in out
    result = json.loads(out_file.read_text())
    assert result["split"] == "test" and result["dtype"] == "bfloat16" and result["windows"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--seq-len", "0"], ["--seq-len"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--max-tokens", "100"], ["--max-tokens 100", "one window"]),
        (["--json", "/no/such/folder/out.json"], ["--json", "does not exist"]),
        (["--dataset", "ptb"], ["unknown --dataset"]),
        (["--dataset", "/no/such/file.txt"], ["does not exist"]),
    ],
)
def test_cheap_errors_stop_before_the_model_load(capsys, no_model_load, wikitext_dir, argv, needles):
    code, out, err = _run(capsys, "--model", "smollm2-135m", "--data-dir", wikitext_dir, *argv)
    _assert_one_error_line(code, err, *needles)
    assert out == ""


def test_missing_dataset_names_flag_and_variable(capsys, no_model_load, monkeypatch, tmp_path):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    code, _, err = _run(capsys, "--model", "smollm2-135m", "--dataset", "wikitext2")
    _assert_one_error_line(code, err, "--data-dir", data.DATA_DIR_ENV)
    code, _, err = _run(capsys, "--model", "smollm2-135m", "--data-dir", tmp_path)
    _assert_one_error_line(code, err, "test.txt does not exist")


def test_model_errors(capsys, tmp_path, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    code, _, err = _run(capsys, "--model", tmp_path / "missing", "--dataset", text_file)
    _assert_one_error_line(code, err, "does not exist")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    code, _, err = _run(capsys, "--model", gpt2, "--dataset", text_file, "--json", tmp_path / "out.json",
                     "--no-progress")
    _assert_one_error_line(code, err, "GPT2LMHeadModel", "supported architectures: Gemma2ForCausalLM, Gemma3ForCausalLM")
    assert not (tmp_path / "out.json").exists()


def test_too_few_tokens_is_a_data_error(capsys, tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(" a few words only \n")
    code, out, err = _run(capsys, "--model", tiny_model_dir, "--dataset", short, "--json", tmp_path / "o.json", "--no-progress")
    _assert_one_error_line(code, err, "one window of seq_len 128")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_subprocess_unreachable_hub_gives_one_line(tmp_path, text_file):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", LAYERPRUNE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "layerprune.cli", "eval", "--model", "someorg/no-such-model", "--dataset", str(text_file)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    _assert_one_error_line(proc.returncode, proc.stderr, "someorg/no-such-model", "hub")
