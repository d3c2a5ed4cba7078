"""GGUF export read back with gguf.GGUFReader: architecture, per-layer arrays, tensor names, shapes, types and
values, the tokenizer, the RoPE permutation, and the command's errors. No llama.cpp needed (that is
tests/test_gguf_llamacpp.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from families import SAMPLE_TEXT, make_tokenizer
from gguf_models import pruned_folder

from layerprune.arch import adapter_for, layer_shapes
from layerprune.errors import InvalidInputError, ModelError
from layerprune.export.gguf import adjacent_pair_rows, export_gguf, plan_layout, rope_factors, write_gguf
from layerprune.export.gguf_vocab import QWEN2_SPLIT, LLAMA3_SPLIT, hf_tokenizer_fields, llama_cpp_pre_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
Q = gguf.GGMLQuantizationType


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def _ne(array_shape) -> list[int]:
    """GGUF's ne order of a transformers [out, in] shape."""
    return [int(x) for x in reversed(array_shape)]


def _as_f32(tensor) -> np.ndarray:
    """A read-back tensor's values as float32, in transformers' [out, in] shape."""
    shape = [int(x) for x in reversed(tensor.shape)]
    if tensor.tensor_type in (Q.F32, Q.F16):
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)


def test_heterogeneous_llama_is_deci_with_per_layer_arrays(tmp_path):
    folder, model, tokenizer = pruned_folder(tmp_path, "llama3-gqa")
    shapes = layer_shapes(model)
    assert len({(s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) for s in shapes}) > 1
    out = tmp_path / "model.gguf"

    result = export_gguf(folder, out, outtype="f32")

    assert result.path == out.absolute() and result.bytes == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, "model.gguf"])  # no temporary left
    reader = gguf.GGUFReader(out)
    fields = _fields(reader)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.head_count"] == [s["num_q_heads"] for s in shapes]
    assert fields["deci.attention.head_count_kv"] == [s["num_kv_heads"] for s in shapes]
    assert fields["deci.feed_forward_length"] == [s["intermediate"] for s in shapes]
    assert fields["deci.attention.key_length"] == fields["deci.attention.value_length"] == 8
    assert fields["deci.rope.dimension_count"] == 8
    assert fields["deci.embedding_length"] == 48
    assert fields["deci.vocab_size"] == 320
    assert fields["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)

    tensors = _tensors(reader)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    adapter = adapter_for(model)
    expected = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i, layer in enumerate(adapter.decoder_layers(model)):
        expected[f"blk.{i}.attn_norm.weight"] = layer.input_layernorm.weight
        expected[f"blk.{i}.ffn_norm.weight"] = layer.post_attention_layernorm.weight
        for hf, name in names.items():
            expected[f"blk.{i}.{name}.weight"] = adapter.projections(layer)[hf].weight
    assert set(tensors) == set(expected)
    for name, param in expected.items():
        t = tensors[name]
        assert list(map(int, t.shape)) == _ne(param.shape), name
        assert t.tensor_type == Q.F32, name
        values = param.detach().numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            i = int(name.split(".")[1])
            heads = shapes[i]["num_q_heads"] if "attn_q" in name else shapes[i]["num_kv_heads"]
            values = adjacent_pair_rows(values, heads)
        np.testing.assert_array_equal(_as_f32(t), values, err_msg=name)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(320)))


def test_homogeneous_llama_keeps_its_architecture_and_scalars(tmp_path):
    folder, model, _ = pruned_folder(tmp_path, "llama2-mha", "homo")
    shapes = layer_shapes(model)
    assert len({(s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) for s in shapes}) == 1

    export_gguf(folder, tmp_path / "m.gguf", outtype="f16")

    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = _fields(reader)
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == shapes[0]["num_q_heads"] == 2
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == shapes[0]["intermediate"] == 32
    assert fields["llama.attention.key_length"] == 8  # written: llama.cpp would take hidden / heads = 16
    tensors = _tensors(reader)
    assert "output.weight" in tensors  # untied
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)


def test_qwen2_pruned_attention_needs_deci_and_keeps_its_biases(tmp_path):
    folder, model, _ = pruned_folder(tmp_path, "qwen2-bias", "homo")
    layout = plan_layout(model)
    assert layout.architecture == "deci" and layout.permute_qk
    assert "hidden x hidden" in layout.notes[0]

    export_gguf(folder, tmp_path / "q.gguf", outtype="f32")

    tensors = _tensors(gguf.GGUFReader(tmp_path / "q.gguf"))
    layer = model.model.layers[0].self_attn
    heads = layer.q_proj.out_features // 4
    np.testing.assert_array_equal(tensors["blk.0.attn_q.bias"].data, adjacent_pair_rows(layer.q_proj.bias.detach().numpy(), heads))
    np.testing.assert_array_equal(tensors["blk.0.attn_v.bias"].data, layer.v_proj.bias.detach().numpy())
    assert "blk.0.attn_output.bias" not in tensors


def test_qwen3_homogeneous_is_qwen3_without_permutation(tmp_path):
    folder, model, _ = pruned_folder(tmp_path, "qwen3-qknorm", "homo")

    export_gguf(folder, tmp_path / "q3.gguf", outtype="f32")

    reader = gguf.GGUFReader(tmp_path / "q3.gguf")
    assert _fields(reader)["general.architecture"] == "qwen3"
    tensors = _tensors(reader)
    attn = model.model.layers[1].self_attn
    np.testing.assert_array_equal(_as_f32(tensors["blk.1.attn_q.weight"]), attn.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_q_norm.weight"].data, attn.q_norm.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.1.attn_k_norm.weight"].data, attn.k_norm.weight.detach().numpy())


def test_qwen3_heterogeneous_is_refused_with_the_reason(tmp_path):
    folder, model, _ = pruned_folder(tmp_path, "qwen3-qknorm")
    with pytest.raises(ModelError, match="deci.*no per-head q/k norms"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_gemma2_heterogeneous_is_refused_with_the_reason(tmp_path):
    folder, model, _ = pruned_folder(tmp_path, "gemma2-caps")
    with pytest.raises(ModelError, match="different widths.*deci.*no gemma2's norms, caps and scales"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_gemma2_homogeneous_carries_its_window_pattern_caps_and_norms_plus_one(tmp_path):
    folder, model, _ = pruned_folder(tmp_path, "gemma2-caps", "homo")
    out = export_gguf(folder, tmp_path / "g2.gguf", outtype="f32")
    assert out.layout.notes == ()  # llama.cpp's gemma2 has the sliding window: nothing to warn about
    reader = gguf.GGUFReader(tmp_path / "g2.gguf")
    fields = _fields(reader)
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attention.sliding_window"] == 4
    assert fields["gemma2.final_logit_softcapping"] == pytest.approx(2.0)
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(3.0)
    assert list(fields["gemma2.attention.sliding_window_pattern"]) == [True, False, True]
    tensors = _tensors(reader)
    layer = model.model.layers[2]
    np.testing.assert_allclose(tensors["blk.2.post_ffw_norm.weight"].data,
                               layer.post_feedforward_layernorm.weight.detach().numpy() + 1.0, rtol=0, atol=1e-7)
    assert "output.weight" not in tensors  # tied: llama.cpp's gemma2 reads token_embd


def test_gemma3_with_an_attention_soft_cap_is_refused(tmp_path):
    """llama.cpp's gemma3 has no attention soft cap: such a model is refused, never written without it."""
    folder, model, _ = pruned_folder(tmp_path, "gemma3-localglobal", "homo")
    config = json.loads((folder / "config.json").read_text())
    config["attn_logit_softcapping"] = 50.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="attn_logit_softcapping"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_mistral_sliding_window_is_reported(tmp_path):
    _, model, _ = pruned_folder(tmp_path, "mistral-window", "homo")
    layout = plan_layout(model)
    assert layout.architecture == "llama"
    assert any("no sliding window" in n and "4 tokens" in n for n in layout.notes)


def test_llama3_rope_becomes_rope_freqs(tmp_path):
    folder, model, _ = pruned_folder(tmp_path, "llama31-rope")
    theta, factors = rope_factors(model, 8)
    assert theta == 500000.0 and factors.max() == pytest.approx(8.0, rel=1e-5)  # the llama3 factor
    assert 1.0 < factors.min() < 8.0  # head_dim 8 and original context 16: no dimension is left unscaled

    export_gguf(folder, tmp_path / "r.gguf", outtype="f32")

    reader = gguf.GGUFReader(tmp_path / "r.gguf")
    tensors = _tensors(reader)
    np.testing.assert_allclose(tensors["rope_freqs.weight"].data, factors.astype(np.float32))
    assert _fields(reader)["deci.rope.freq_base"] == 500000.0


def test_adjacent_pair_rows_turns_half_split_rope_into_adjacent_pairs():
    """HF RoPE (rotate_half) on W·x equals, after the row permutation, RoPE over adjacent pairs on W'·x."""
    heads, hd, d = 3, 8, 5
    weight = torch.randn(heads * hd, d, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64)
    pos = 7.0
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angle = pos * inv
    q = (weight @ x).view(heads, hd)
    cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
    rotated = q * cos + torch.cat([-q[:, hd // 2:], q[:, :hd // 2]], dim=1) * sin  # transformers' rotate_half
    permuted = torch.from_numpy(adjacent_pair_rows(weight.numpy(), heads))
    p = (permuted @ x).view(heads, hd // 2, 2)
    even, odd = p[..., 0], p[..., 1]
    ggml = torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], dim=-1)
    # pair i of the adjacent layout holds dimensions i and i + hd/2 of transformers' layout
    back = torch.cat([ggml[..., 0], ggml[..., 1]], dim=1)
    torch.testing.assert_close(back, rotated)


@pytest.mark.parametrize("outtype, matrix_type", [("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)])
def test_outtypes_round_trip(tmp_path, tiny_llama, outtype, matrix_type):
    model = tiny_llama(num_heads=8, num_kv_heads=2, head_dim=8, hidden=64, intermediate=96, vocab=320, tie=True)
    out = write_gguf(model, make_tokenizer(), tmp_path / "t.gguf", outtype=outtype)
    tensors = _tensors(gguf.GGUFReader(out.path))
    gate = model.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    t = tensors["blk.0.ffn_gate.weight"]
    assert t.tensor_type == matrix_type
    tolerance = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[outtype]
    np.testing.assert_allclose(_as_f32(t), gate, atol=tolerance * np.abs(gate).max())
    if outtype == "q8_0":  # down_proj rows are 96 = 3 blocks; all matrices here are multiples of 32
        assert {tensors[n].tensor_type for n in tensors if len(tensors[n].shape) == 2} == {Q.Q8_0}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32


def test_q8_0_falls_back_to_f16_for_rows_off_the_block(tmp_path):
    folder, _, _ = pruned_folder(tmp_path, "llama3-gqa")
    export_gguf(folder, tmp_path / "q.gguf", outtype="q8_0")
    tensors = _tensors(gguf.GGUFReader(tmp_path / "q.gguf"))
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.F16  # 48 values a row: not whole 32-value blocks
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16


def test_hf_tokenizer_fields_describe_the_tokenizer():
    tokenizer = make_tokenizer()
    description, fields = hf_tokenizer_fields(tokenizer, 324)
    values = {k: v for k, v, _, _ in fields}
    assert "gpt-2" in description
    assert values["tokenizer.ggml.tokens"][:320] == tokenizer.convert_ids_to_tokens(list(range(320)))
    assert values["tokenizer.ggml.tokens"][320:] == ["[PAD320]", "[PAD321]", "[PAD322]", "[PAD323]"]
    assert values["tokenizer.ggml.token_type"][320:] == [5] * 4
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert values["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert values["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("steps, name", [
    ([{"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}], "gpt-2"),
    ([{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "add_prefix_space": False}], "smollm"),
    ([{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
      {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}], "llama-bpe"),
    ([{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
      {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}], "qwen2"),
])
def test_pre_tokenizer_is_named_by_its_split_rules(steps, name):
    data = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}, "normalizer": None,
            "model": {"type": "BPE", "ignore_merges": name == "llama-bpe"}}
    assert llama_cpp_pre_tokenizer(data) == name


def test_unknown_pre_tokenizer_is_refused():
    data = {"pre_tokenizer": {"type": "Whitespace"}, "normalizer": None, "model": {"type": "BPE"}}
    with pytest.raises(ModelError, match="matches none of llama.cpp's"):
        llama_cpp_pre_tokenizer(data)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    folder, _, _ = pruned_folder(tmp_path, "llama3-gqa")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError):
        export_gguf(folder, out, overwrite=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, "m.gguf"])


def test_output_path_is_checked_first(tmp_path):
    folder, _, _ = pruned_folder(tmp_path, "llama3-gqa")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="exists; pass --overwrite"):
        export_gguf(folder, tmp_path / "exists.gguf")
    with pytest.raises(InvalidInputError, match="does not exist"):
        export_gguf(folder, tmp_path / "missing" / "m.gguf")
    with pytest.raises(InvalidInputError, match="is a folder"):
        export_gguf(folder, tmp_path)


def _cli(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "layerprune", "export", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("layerprune export: error:"), proc.stderr
    return lines[0]


def test_cli_writes_a_file_and_refuses_bad_input(tmp_path):
    folder, model, tokenizer = pruned_folder(tmp_path, "llama3-gqa")
    out = tmp_path / "cli.gguf"
    ok = _cli("--model", str(folder), "--format", "gguf", "--out", str(out), "--outtype", "f32", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert "architecture: deci" in ok.stdout and "per-layer arrays" in ok.stdout
    assert "written as `deci`" in ok.stderr
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "deci"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json" in _one_error_line(_cli("--model", str(empty), "--out", str(tmp_path / "a.gguf")))

    unsupported = tmp_path / "gemma"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}))
    line = _one_error_line(_cli("--model", str(unsupported), "--out", str(tmp_path / "b.gguf")))
    assert "does not support" in line and "LlamaForCausalLM" in line

    line = _one_error_line(_cli("--model", str(folder), "--out", str(tmp_path / "no" / "c.gguf")))
    assert "does not exist" in line
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere
            assert "not writable" in _one_error_line(_cli("--model", str(folder), "--out", str(locked / "d.gguf")))
    finally:
        locked.chmod(0o700)
    assert "exists" in _one_error_line(_cli("--model", str(folder), "--out", str(out)))
    line = _one_error_line(_cli("--model", str(out), "--out", str(tmp_path / "e.gguf")))
    assert "already a GGUF file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, "cli.gguf", "empty", "gemma", "locked"])


@pytest.mark.slow
def test_embedded_tokenizer_is_copied_from_its_gguf(tmp_path):
    """The embedded SmolLM2's tokenizer entries come from the GGUF it was converted from; the tokenizer.json
    route agrees with them on tokens, types and merges (it names the pre-tokenizer after the split rules the
    converted tokenizer.json holds)."""
    from layerprune.export.gguf_vocab import embedded_tokenizer_fields
    from layerprune.models import embedded_gguf_path, load_model

    model, tokenizer = load_model("smollm2-135m")
    copied = embedded_tokenizer_fields(tokenizer)
    assert copied is not None
    source = {k: f.contents() for k, f in gguf.GGUFReader(embedded_gguf_path()).fields.items()
              if k.startswith("tokenizer.")}
    assert {k: v for k, v, _, _ in copied[1]} == source
    _, fields = hf_tokenizer_fields(tokenizer, 49152)
    ours = {k: v for k, v, _, _ in fields}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours[key] == source[key], key
    out = write_gguf(model, tokenizer, tmp_path / "smol.gguf", outtype="q8_0")
    reader = gguf.GGUFReader(out.path)
    assert _fields(reader)["tokenizer.ggml.pre"] == "smollm"
    assert _fields(reader)["general.architecture"] == "llama"
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {Q.Q8_0}
    assert tokenizer(SAMPLE_TEXT).input_ids  # the tokenizer still works after the export


def test_homogeneous_llama_gguf_reloads_in_transformers(tmp_path):
    """transformers' own GGUF reader (which undoes llama.cpp's Q/K order) rebuilds the model exactly: an
    independent check of names, shapes, metadata and the permutation."""
    from transformers import AutoModelForCausalLM

    folder, model, _ = pruned_folder(tmp_path, "llama3-gqa", "homo")
    out = export_gguf(folder, tmp_path / "h.gguf", outtype="f32")
    assert out.layout.architecture == "llama"
    reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="h.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reread(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_sentencepiece_tokenizer_is_written_as_llama_vocabulary(tmp_path, tiny_llama, wikitext_dir):
    from gguf_models import sentencepiece_tokenizer

    from layerprune.data import load_rows

    tokenizer = sentencepiece_tokenizer("".join(load_rows("wikitext2", "valid", str(wikitext_dir)))[:60000])
    model = tiny_llama(vocab=len(tokenizer), tie=True)
    out = write_gguf(model, tokenizer, tmp_path / "spm.gguf", outtype="f32")
    assert "SentencePiece" in out.tokenizer
    fields = _fields(gguf.GGUFReader(out.path))
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3] and set(types[3:259]) == {6} and set(types[259:]) == {1}  # unk, control, bytes
    scores = fields["tokenizer.ggml.scores"]
    merged = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    first = "".join(merged[0]) if isinstance(merged[0], list) else merged[0].replace(" ", "")
    assert scores[tokenizer.convert_tokens_to_ids(first)] == 0.0 and min(scores) == -(len(merged) - 1)
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)


def test_a_name_llama_cpp_keys_a_vocabulary_rule_on_is_spaced_out_only_without_its_tokens():
    """llama.cpp looks up </s>, <unk>, <s> and <|endoftext|> for a general.name holding phi3 / phi-3 (and fails
    without them); layerprune's tiny vocabularies have none, a real Phi-3 one has all four."""
    from layerprune.export.gguf import llama_cpp_safe_name

    class Vocab:
        def __init__(self, tokens):
            self.tokens = {t: i for i, t in enumerate(tokens)}

        def get_vocab(self):
            return self.tokens

    bare, phi3 = Vocab(["a", "b"]), Vocab(["</s>", "<unk>", "<s>", "<|endoftext|>"])
    assert llama_cpp_safe_name("phi3-mini-pruned", bare) == "phi 3-mini-pruned"
    assert llama_cpp_safe_name("Phi-3.5-mini", bare) == "Phi 3.5-mini"
    assert llama_cpp_safe_name("phi3-mini-pruned", phi3) == "phi3-mini-pruned"
    assert llama_cpp_safe_name("smol-25", bare) == "smol-25"
