"""Saving and reloading pruned models with per-layer widths, with and without layerprune installed."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from families import BLOCK_LAYERPRUNE
from safetensors import safe_open

import layerprune.export.save as pruned_io
from layerprune.errors import InvalidInputError, ModelError
from layerprune.export import save_pruned
from layerprune.models import is_pruned_folder, load_pruned
from layerprune.arch import layer_shapes
from layerprune.pruning import pruned_copy as prune_llama
from layerprune.scoring.selection import LayerKeep

VOCAB = 128


def _tokenizer():
    """A word-level tokenizer saved like SmolLM2's (transformers 5: tokenizer_class TokenizersBackend)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(1, VOCAB)} | {"[UNK]": 0}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    cls = getattr(transformers, "TokenizersBackend", transformers.PreTrainedTokenizerFast)
    return cls(tokenizer_object=backend, unk_token="[UNK]")


def _pruned_model(tie: bool = True, bias: bool = False):
    """GQA 3:1 with different widths in every layer (one layer left whole)."""
    dense = make_tiny_llama(num_heads=12, num_kv_heads=4, head_dim=8, hidden=48, layers=3, tie=tie, bias=bias, seed=5)
    keep = [
        LayerKeep(kv_heads=(3,), mlp_channels=tuple(range(1, 96, 5))),
        LayerKeep(kv_heads=(0, 1, 2, 3), mlp_channels=tuple(range(96))),
        LayerKeep(kv_heads=(0, 2), mlp_channels=tuple(range(40, 90))),
    ]
    return prune_llama(dense, keep)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)], ids=["tied", "untied-bias"])
def test_save_then_load_pruned(tmp_path, capfd, tie, bias):
    model = _pruned_model(tie=tie, bias=bias)
    config_before = model.config.to_dict()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = _tokenizer()
    report = {"method": "test", "ppl": float("nan"), "kept": torch.tensor([1, 2]), "rate": np.float32(0.5),
              "shape": np.array([[3, 4]])}

    out = save_pruned(model, tokenizer, tmp_path / "pruned", report=report)

    assert out == (tmp_path / "pruned").absolute()
    # the input model is not modified
    assert model.config.to_dict() == config_before
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    # nothing left behind next to the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]

    config = json.loads((out / "config.json").read_text())
    shapes = layer_shapes(model)
    assert config["model_type"] == "llama" and config["architectures"] == ["LayerpruneLlamaForCausalLM"]
    assert config["layer_num_attention_heads"] == [3, 12, 6] == [s["num_q_heads"] for s in shapes]
    assert config["layer_num_key_value_heads"] == [1, 4, 2]
    assert config["layer_intermediate_sizes"] == [19, 96, 50]
    assert config["layerprune"]["version"] and config["layerprune"]["format"] == 2
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_layerprune.LayerpruneLlamaForCausalLM"
    assert config["tie_word_embeddings"] is tie
    assert json.loads((out / "report.json").read_text()) == {
        "method": "test", "ppl": None, "kept": [1, 2], "rate": 0.5, "shape": [[3, 4]]}
    assert (out / "modeling_layerprune.py").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is (not tie)  # tied embeddings are stored once

    capfd.readouterr()
    loaded, loaded_tokenizer = load_pruned(out)
    printed = capfd.readouterr()
    assert "custom code" not in printed.out + printed.err  # no trust_remote_code prompt inside layerprune
    assert layer_shapes(loaded) == shapes
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-6, rtol=0)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie
    assert loaded_tokenizer("w3 w5 w7").input_ids == tokenizer("w3 w5 w7").input_ids
    generated = loaded.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, model.generate(ids[:1], max_new_tokens=5, do_sample=False))


def test_load_pruned_dtype(tmp_path):
    model = _pruned_model()
    out = save_pruned(model, None, tmp_path / "m")
    loaded, tokenizer = load_pruned(out, dtype=torch.bfloat16)
    assert tokenizer is None
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.generate(_ids()[:1], max_new_tokens=3, do_sample=False).shape == (1, 13)


_STANDALONE = BLOCK_LAYERPRUNE + textwrap.dedent(
    """
    folder, ids_path, out_path = sys.argv[2], sys.argv[3], sys.argv[4]

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.load(ids_path)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    generated = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    torch.save({"logits": logits, "generated": generated, "class": type(model).__name__,
                "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                "modules": sorted(m for m in sys.modules if m.startswith("layerprune"))}, out_path)
    """
)


def test_auto_model_loads_without_layerprune(tmp_path):
    model = _pruned_model(tie=True)
    folder = save_pruned(model, None, tmp_path / "pruned")
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    # PYTHONPATH first: `make floor-test` shadows transformers with its declared floor there
    site_dirs = [d for d in (*os.environ.get("PYTHONPATH", "").split(os.pathsep), *site.getsitepackages())
                 if d and Path(d).is_dir()]
    script = _STANDALONE
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, os.pathsep.join(site_dirs), str(folder),
         str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["modules"] == []
    assert out["class"] == "LayerpruneLlamaForCausalLM"
    assert out["tied"] is True
    torch.testing.assert_close(out["logits"], _logits(model, ids), atol=1e-6, rtol=0)
    assert torch.equal(out["generated"], model.generate(ids[:1], max_new_tokens=5, do_sample=False))


def test_refuses_non_empty_folder_without_overwrite(tmp_path):
    model = _pruned_model()
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="--overwrite"):
        save_pruned(model, None, target)
    assert (target / "old.txt").read_text() == "keep me"

    save_pruned(model, None, target, overwrite=True)
    assert not (target / "old.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # an empty existing folder is fine without overwrite
    (tmp_path / "empty").mkdir()
    save_pruned(model, None, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_failure_midway_leaves_no_partial_folder(tmp_path, monkeypatch):
    model = _pruned_model()

    def broken_copy(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pruned_io.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="simulated"):
        save_pruned(model, None, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "old.txt").write_text("old")
    with pytest.raises(OSError, match="simulated"):
        save_pruned(model, None, existing, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert [p.name for p in existing.iterdir()] == ["old.txt"]


def test_load_refuses_folder_without_marker(tmp_path):
    dense = make_tiny_llama()
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ModelError, match="not saved by layerprune"):
        load_pruned(tmp_path / "dense")
    with pytest.raises(ModelError, match="no config.json"):
        load_pruned(tmp_path / "missing")
    assert not is_pruned_folder(tmp_path / "dense")


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not a folder"):
        save_pruned(_pruned_model(), None, tmp_path / "file")


def test_reloaded_model_can_be_pruned_again_and_resaved(tmp_path):
    from layerprune.pruning import masked_dense_forward

    loaded, _ = load_pruned(save_pruned(_pruned_model(), None, tmp_path / "a"))
    keep = [LayerKeep((0,), (0, 1)), LayerKeep((1, 3), tuple(range(50))), LayerKeep((1,), (3,))]
    pruned_again = prune_llama(loaded, keep)
    reference = masked_dense_forward(loaded, _ids(), keep)
    reloaded, _ = load_pruned(save_pruned(pruned_again, None, tmp_path / "b"))
    assert [s["num_kv_heads"] for s in layer_shapes(reloaded)] == [1, 2, 1]
    torch.testing.assert_close(_logits(reloaded, _ids()), reference, atol=1e-5, rtol=0)


def test_report_must_be_json(tmp_path):
    with pytest.raises(InvalidInputError, match="report: value of type object"):
        save_pruned(_pruned_model(), None, tmp_path / "m", report={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_folder_respects_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        from layerprune import atomic

        atomic._umask.cache_clear()
        out = save_pruned(_pruned_model(), _tokenizer(), tmp_path / "m", report={"a": 1})
    finally:
        os.umask(old)
        atomic._umask.cache_clear()
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}


def test_overwrite_swaps_in_one_step_and_fsyncs(tmp_path, monkeypatch):
    from layerprune import atomic

    out = save_pruned(_pruned_model(), None, tmp_path / "m")
    (out / "old-marker").write_text("old")
    swaps, synced = [], []
    real_exchange, real_fsync = atomic._exchange, os.fsync

    def exchange(a, b):
        assert b.exists() and (b / "old-marker").exists()  # the old folder is in place until the swap
        swaps.append((a, b))
        return real_exchange(a, b)

    monkeypatch.setattr(atomic, "_exchange", exchange)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    save_pruned(_pruned_model(), None, out, overwrite=True)
    assert len(swaps) == 1 and not (out / "old-marker").exists()
    assert len(synced) >= len(list(out.iterdir())) + 2  # every file, the folder, its parent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_crash_between_two_renames_is_repaired(tmp_path):
    """Without an atomic swap a crash can leave only `.m.old-PID-*`: the next save puts it back, then replaces it."""
    out = save_pruned(_pruned_model(), None, tmp_path / "m")
    aside = tmp_path / f".m.old-{_dead_pid()}-abc"
    os.replace(out, aside)  # the state a kill -9 between the two renames leaves
    (tmp_path / f".m.tmp-{_dead_pid()}-xyz").mkdir()  # and a dead writer's temporary folder
    with pytest.raises(InvalidInputError, match="--overwrite"):
        save_pruned(_pruned_model(), None, out)  # the old folder is back, so it is not silently replaced
    assert (out / "model.safetensors").is_file()
    save_pruned(_pruned_model(), None, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_fallback_without_atomic_swap(tmp_path, monkeypatch):
    from layerprune import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = save_pruned(_pruned_model(), None, tmp_path / "m")
    (out / "old-marker").write_text("old")
    save_pruned(_pruned_model(), None, out, overwrite=True)
    assert not (out / "old-marker").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
