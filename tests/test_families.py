"""Every supported family end to end on tiny random checkpoints of its real config class.

Per family: pruned logits equal the dense model's with the same heads and channels masked, the budget is
exact, both reloads (layerprune's and plain transformers' remote code, in a process where layerprune cannot
be imported) give the pruned model's logits, the saved config keeps the family's settings, and the tokenizer
loads without a remote-code prompt.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from gguf_models import empty_blocks_keep
from families import BLOCK_LAYERPRUNE, CASE_IDS, CASES, SAMPLE_TEXT, FamilyCase, logits, make_model, make_tokenizer, token_ids, plain_config

from layerprune.allocation import spec_from_model_config
from layerprune.arch import adapter_for, layer_shapes
from layerprune.errors import ModelError
from layerprune.export import save_pruned
from layerprune.models import count_parameters, load_model, load_pruned
from layerprune.pruning import masked_dense_forward, prune, pruned_copy
from layerprune.scoring.selection import LayerKeep

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 2e-5


def _keep(model) -> list[LayerKeep]:
    """A different, non-prefix choice in every layer (last KV group kept, every other channel from an offset)."""
    keep = []
    for i, s in enumerate(layer_shapes(model)):
        groups = tuple(sorted({s["num_kv_heads"] - 1, *range(0, s["num_kv_heads"] - 1, 2 + i)}))
        channels = tuple(range(i, s["intermediate"], 2 + i))
        keep.append(LayerKeep(kv_heads=groups, mlp_channels=channels))
    return keep


def _dense_folder_tokens(dense, tokenizer, folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    dense.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)(SAMPLE_TEXT).input_ids


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request) -> FamilyCase:
    return request.param


@pytest.fixture(scope="module")
def pruned_pair(case):
    dense = make_model(case)
    keep = _keep(dense)
    return dense, keep, pruned_copy(dense, keep)


def test_pruned_logits_equal_masked_dense(pruned_pair):
    dense, keep, pruned = pruned_pair
    ids = token_ids()
    torch.testing.assert_close(logits(pruned, ids), masked_dense_forward(dense, ids, keep), atol=ATOL, rtol=0)
    shapes = layer_shapes(pruned)
    ratio = layer_shapes(dense)[0]["num_q_heads"] // layer_shapes(dense)[0]["num_kv_heads"]
    assert [s["num_kv_heads"] for s in shapes] == [len(k.kv_heads) for k in keep]
    assert [s["num_q_heads"] for s in shapes] == [ratio * len(k.kv_heads) for k in keep]


def test_written_out_blocks_and_head_are_the_models_forward(case):
    """What layer importance, the layer-by-layer losses, the search and healing compute without the model's own
    forward (the adapter's pre-norm blocks, the head loss, healing's body and head) equals that forward: Granite's
    embedding, residual and logit scales included."""
    from layerprune.healing.trainer import body_and_head
    from layerprune.models.layer_calls import head_loss, layer_arguments, layer_call

    model = make_model(case)
    adapter = adapter_for(model)
    ids = token_ids(batch=2, length=12, seed=3)
    with torch.no_grad():
        hidden, kwargs = layer_arguments(model, input_ids=ids)
        for layer, kw in zip(adapter.decoder_layers(model), kwargs):
            written = adapter.layer_forward(layer, hidden, kw)
            hidden = layer_call(layer, hidden, kw)
            torch.testing.assert_close(written, hidden, atol=ATOL, rtol=0)
        out = model(input_ids=ids, labels=ids)
        assert head_loss(model, hidden, ids) == pytest.approx(float(out.loss), rel=1e-5)
        body, head, divisor, softcap = body_and_head(model)
        z = head(body(input_ids=ids).last_hidden_state / divisor)
        torch.testing.assert_close(z if softcap is None else (z / softcap).tanh() * softcap, out.logits,
                                   atol=ATOL, rtol=0)


def test_budget_formula_is_the_models_count(case):
    dense = make_model(case)
    spec = spec_from_model_config(dense.config, 0.2)
    counts = count_parameters(dense)
    assert spec.params_layers == counts["decoder_layers"] and spec.params_total == counts["total"]
    # and it stays exact after pruning: the formula at the kept widths is the pruned model's count
    pruned = pruned_copy(dense, _keep(dense))
    kept = sum(shape.params(len(k.kv_heads), len(k.mlp_channels)) for shape, k in zip(spec.layers, _keep(dense)))
    assert kept + spec.extra_params == count_parameters(pruned)["total"]


def test_prune_lands_on_the_allocation_exactly(case):
    dense = make_model(case)
    calib = token_ids(batch=4, length=16, seed=3)
    result = prune(dense, None, plain_config(ratio=0.2, layer_importance="removal", calib_samples=4), calib_ids=calib,
                   progress=False)
    after = count_parameters(result.model)["total"]
    assert after == result.allocation.params_after
    assert result.report["family"] == adapter_for(dense).name
    window = result.allocation.target_removed, result.allocation.target_removed + result.allocation.granule
    assert window[0] <= count_parameters(dense)["total"] - after <= window[1]


def test_save_keeps_family_settings_and_reloads(tmp_path, case, pruned_pair):
    dense, keep, pruned = pruned_pair
    tokenizer = make_tokenizer()
    folder = save_pruned(pruned, tokenizer, tmp_path / case.name)
    saved = json.loads((folder / "config.json").read_text())
    adapter = adapter_for(dense)
    original = dense.config.to_dict()
    for key in adapter.kept_settings:
        assert saved.get(key) == original.get(key), key
    for key, value in case.settings.items():
        assert saved[key] == value, key
    assert saved["layer_num_key_value_heads"] == [len(k.kv_heads) for k in keep]
    loaded, loaded_tokenizer = load_pruned(folder)
    ids = token_ids(seed=7)
    torch.testing.assert_close(logits(loaded, ids), logits(pruned, ids), atol=1e-6, rtol=0)
    for (name, a), (_, b) in zip(loaded.named_parameters(), pruned.named_parameters()):
        assert torch.equal(a, b), name
    # the folder tokenizes exactly as the dense checkpoint's own folder does (transformers picks the class
    # from the family's model_type, so that is the reference, not the in-memory tokenizer)
    tokens = loaded_tokenizer(SAMPLE_TEXT).input_ids
    assert tokens == _dense_folder_tokens(dense, tokenizer, tmp_path / "dense") == tokenizer(SAMPLE_TEXT).input_ids
    # layerprune eval / compare read the same folder through load_model
    again, _ = load_model(folder)
    torch.testing.assert_close(logits(again, ids), logits(pruned, ids), atol=1e-6, rtol=0)


def test_sliding_window_is_in_force_after_reload(tmp_path):
    """The Mistral case's window (4) is shorter than the test sequence: dropping it changes the logits."""
    case = next(c for c in CASES if "sliding_window" in c.settings)
    dense = make_model(case)
    pruned = pruned_copy(dense, _keep(dense))
    loaded, _ = load_pruned(save_pruned(pruned, None, tmp_path / "m"))
    ids = token_ids(length=16)
    assert loaded.config.sliding_window == case.settings["sliding_window"]
    torch.testing.assert_close(logits(loaded, ids), logits(pruned, ids), atol=1e-6, rtol=0)
    pruned.config.sliding_window = None
    assert not torch.allclose(logits(pruned, ids), logits(loaded, ids), atol=1e-4)


_STANDALONE = BLOCK_LAYERPRUNE + textwrap.dedent(
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jobs_path, sample = sys.argv[2], sys.argv[3]
    for folder, ids_path, out_path in json.load(open(jobs_path)):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)  # stdin is closed: a prompt would fail here
        ids = torch.load(ids_path)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False).logits
        torch.save({"logits": out, "class": type(model).__name__, "tokens": tokenizer(sample).input_ids,
                    "modules": sorted(m for m in sys.modules if m.startswith("layerprune"))}, out_path)
    """
)


def test_plain_transformers_reload_every_family(tmp_path):
    """One isolated process loads every family's folder with trust_remote_code and AutoTokenizer, and the same
    family's folder with empty blocks (no attention in layers 0 and 1, no MLP in layers 1 and 2)."""
    jobs, expected = [], {}
    for case in CASES:
        dense = make_model(case)
        tokens = _dense_folder_tokens(dense, make_tokenizer(), tmp_path / f"{case.name}-dense")
        for name, keep in ((case.name, _keep(dense)), (f"{case.name}-empty", empty_blocks_keep(dense))):
            pruned = pruned_copy(dense, keep)
            folder = save_pruned(pruned, make_tokenizer(), tmp_path / name)
            ids = token_ids(seed=11)
            torch.save(ids, tmp_path / f"{name}.ids.pt")
            jobs.append([str(folder), str(tmp_path / f"{name}.ids.pt"), str(tmp_path / f"{name}.out.pt")])
            expected[name] = (logits(pruned, ids), adapter_for(dense).pruned_architecture, tokens)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    # PYTHONPATH first: `make floor-test` shadows transformers with its declared floor there
    site_dirs = [d for d in (*os.environ.get("PYTHONPATH", "").split(os.pathsep), *site.getsitepackages())
                 if d and Path(d).is_dir()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _STANDALONE, os.pathsep.join(site_dirs), str(tmp_path / "jobs.json"),
         SAMPLE_TEXT],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    for name, (want_logits, want_class, want_tokens) in expected.items():
        out = torch.load(tmp_path / f"{name}.out.pt")
        assert out["modules"] == [] and out["class"] == want_class, name
        assert out["tokens"] == want_tokens, name
        torch.testing.assert_close(out["logits"], want_logits, atol=1e-6, rtol=0, msg=name)


def _unsupported_model(family: str):
    import transformers

    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@pytest.mark.parametrize("family", ["Olmo", "Gemma"])
def test_unsupported_family_is_refused_by_every_entry_point(tmp_path, family):
    """OLMo 1 (norms without weights) and Gemma (the Llama attribute names, other maths: a (1 + w) norm, scaled
    embeddings): one error line naming the supported architectures, before any work."""
    from layerprune.importance import layer_importance
    from layerprune.scoring.groups import element_group_scores

    model = _unsupported_model(family)
    ids = token_ids(batch=2, length=8)
    message = (f"(?i){family}.*, which layerprune does not support; supported architectures: "
               "Gemma2ForCausalLM, Gemma3ForCausalLM, GraniteForCausalLM, LlamaForCausalLM, MistralForCausalLM, Olmo2ForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM$")
    calls = {
        "prune": lambda: prune(model, None, plain_config(ratio=0.2), calib_ids=ids, progress=False),
        "layer_importance": lambda: layer_importance(model, ids, "removal", progress=False),
        "element_group_scores": lambda: element_group_scores(model, ids, "l1", progress=False),
        "spec_from_model_config": lambda: spec_from_model_config(model.config, 0.2),
        "save_pruned": lambda: save_pruned(model, None, tmp_path / "out"),
    }
    for name, call in calls.items():
        with pytest.raises(ModelError, match=message) as info:
            call()
        assert "\n" not in str(info.value), name
    assert not (tmp_path / "out").exists()
    model.save_pretrained(tmp_path / family)
    with pytest.raises(ModelError, match=message):
        load_model(tmp_path / family, require_tokenizer=False)


@pytest.mark.slow
def test_cli_prune_eval_compare_every_family(tmp_path, wikitext_dir, capsys):
    """`layerprune prune`, then `eval` and `export` on its output, on a saved checkpoint of each family; `compare` on
    four."""
    from layerprune.cli import main

    data = ["--data-dir", str(wikitext_dir)]
    small = ["--calib-samples", "2", "--calib-seq-len", "16", "--no-progress", "--threads", "1"]
    for case in CASES:
        dense_dir, out = tmp_path / case.name / "dense", tmp_path / case.name / "pruned"
        dense = make_model(case)
        dense.save_pretrained(dense_dir)
        make_tokenizer().save_pretrained(dense_dir)
        assert main(["prune", "--model", str(dense_dir), "--ratio", "0.2", "--out", str(out),
                     "--layer-importance", "sensitivity", *data, *small]) == 0, case.name
        report = json.loads((out / "report.json").read_text())
        assert report["family"] == adapter_for(dense).name
        assert report["params_after"]["total"] == report["allocation"]["params_after"]
        assert 0.19 < report["actual_ratio"] < 0.3
        result = tmp_path / case.name / "eval.json"
        assert main(["eval", "--model", str(out), *data, "--max-tokens", "512", "--seq-len", "32", "--no-progress",
                     "--json", str(result)]) == 0, case.name
        evaluated = json.loads(result.read_text())
        assert evaluated["params"]["total"] == report["params_after"]["total"]
        assert evaluated["ppl"] > 1.0
        gguf_status = main(["export", "--model", str(out), "--out", str(tmp_path / case.name / "m.gguf")])
        # deci lacks their norms; llama.cpp's llama / deci graphs apply no LongRoPE
        refused = case.name in ("qwen3-qknorm", "gemma2-caps", "gemma3-localglobal", "phi3-fused", "olmo2-postnorm")
        assert gguf_status == (2 if refused else 0), case.name
        assert (tmp_path / case.name / "m.gguf").exists() != refused
        if case.name in ("qwen2-bias", "qwen3-qknorm", "gemma2-caps", "granite-scales"):
            cmp_out = tmp_path / case.name / "compare"
            methods = "dense,uniform-range,uniform,uniform-refit,flap,unbalanced-seed,unbalanced"
            assert main(["compare", "--model", str(dense_dir), "--ratios", "0.2", "--out", str(cmp_out), *data,
                         "--max-tokens", "512", "--seq-len", "32", "--no-generate", "--methods", methods,
                         *small]) == 0, case.name
            runs = json.loads((cmp_out / "report.json").read_text())["runs"]
            assert {r["method"] for r in runs} == set(methods.split(","))
    capsys.readouterr()


def test_fused_projections_split_in_place_keep_the_forward_and_read_as_byte_ranges(tmp_path):
    """Phi-3's qkv_proj / gate_up_proj become q/k/v and gate/up Linears holding exactly their rows; the logits do not
    change; a copy calls its own parts; a dense checkpoint's fused tensors read, layer by layer, as the same rows."""
    import copy

    from layerprune.models.checkpoint import SafetensorsCheckpoint

    (case,) = [c for c in CASES if "fused" in c.name]
    model = make_model(case)
    ids = token_ids()
    before = logits(model, ids)
    fused = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.save_pretrained(tmp_path / "dense")
    adapter_for(model).decoder_layers(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-6)
    config, state = model.config, model.state_dict()
    q, kv = config.num_attention_heads * 8, config.num_key_value_heads * 8
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        qkv, gate_up = fused[f"{p}.self_attn.qkv_proj.weight"], fused[f"{p}.mlp.gate_up_proj.weight"]
        assert f"{p}.self_attn.qkv_proj.weight" not in state and f"{p}.mlp.gate_up_proj.weight" not in state
        for name, rows in (("self_attn.q_proj", qkv[:q]), ("self_attn.k_proj", qkv[q:q + kv]),
                           ("self_attn.v_proj", qkv[q + kv:]), ("mlp.gate_proj", gate_up[:config.intermediate_size]),
                           ("mlp.up_proj", gate_up[config.intermediate_size:])):
            assert torch.equal(state[f"{p}.{name}.weight"], rows), (p, name)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.layers[0].self_attn.k_proj.weight.zero_()
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-6)  # the copy's parts are its own
    assert not torch.allclose(logits(twin, ids), before)
    with SafetensorsCheckpoint(tmp_path / "dense") as checkpoint:
        checkpoint.check_config(config)
        for name, tensor in state.items():
            if name != "lm_head.weight":
                assert torch.equal(checkpoint.read(name), tensor), name
