"""The two example scripts (LLM-Pruner's llama3.py, uniform and unbalanced, on layerprune.torch_pruning) run on a
tiny model with its tokenizer, and give what layerprune's own pipeline gives for the same settings; the
benchmark runs and reports both pruners."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, make_tiny_llama
from families import CASES, make_model, make_tokenizer, plain_config

from layerprune.allocation import allocate, spec_from_model_config
from layerprune.data import calibration_batch
from layerprune.importance import layer_importance
from layerprune.models import count_parameters, load_model, load_pruned
from layerprune.pruning import prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GQA = next(c for c in CASES if c.name == "llama31-rope")  # 6 query heads on 3 KV heads, 3 layers


def _example(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, wikitext_dir):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_model(GQA).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _weights_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_uniform_example_is_llm_pruners_block_wise_setting(tiny_folder, wikitext_dir, tmp_path):
    out = tmp_path / "pruned"
    result = _example("llama3_uniform").main([
        "--base_model", str(tiny_folder), "--pruning_ratio", "0.5", "--block_attention_layer_start", "1",
        "--block_mlp_layer_start", "1", "--num_examples", "4", "--data_dir", str(wikitext_dir), "--eval_tokens", "512",
        "--save_model", str(out)])
    dense, tokenizer = load_model(tiny_folder)
    calib = calibration_batch(tokenizer, 4, 64, seed=42, data_dir=wikitext_dir)
    last = len(dense.model.layers) - 1
    reference = prune(dense, tokenizer, plain_config(ratio=0.5, mode="uniform", layer_start=1, layer_end=last),
                      calib_ids=calib, progress=False)
    assert result["params_after"] == count_parameters(reference.model)["total"] < result["params_before"]
    assert result["kv_heads"] == [3, 2, 3] and result["intermediate"] == [64, 32, 64]
    pruned, _ = load_pruned(out)
    _weights_equal(pruned, reference.model)
    assert result["ppl"] > 1


def test_unbalanced_example_lands_on_the_allocation(tiny_folder, wikitext_dir):
    result = _example("llama3_unbalanced").main([
        "--base_model", str(tiny_folder), "--pruning_ratio", "0.3", "--num_examples", "4", "--solver", "dp",
        "--data_dir", str(wikitext_dir), "--iterative_steps", "2"])
    dense, tokenizer = load_model(tiny_folder)
    calib = calibration_batch(tokenizer, 4, 64, seed=42, data_dir=wikitext_dir)
    importance = layer_importance(dense, calib, "removal", progress=False)
    plan = allocate(spec_from_model_config(dense.config, 0.3, attn_importance=importance.attn.clip(min=0),
                                           mlp_importance=importance.mlp.clip(min=0), min_effective_rate=0.15), "dp")
    assert result["params_after"] == result["planned_params_after"] == plan.params_after
    assert result["kv_heads"] == [a.kv_groups_kept for a in plan.layers]
    assert result["intermediate"] == [a.mlp_kept for a in plan.layers]
    assert len(set(zip(result["kv_heads"], result["intermediate"]))) > 1  # per-layer rates, not one rate


def test_seed_solver_is_the_default_of_the_unbalanced_example(tiny_folder, wikitext_dir):
    result = _example("llama3_unbalanced").main([
        "--base_model", str(tiny_folder), "--pruning_ratio", "0.3", "--num_examples", "4",
        "--data_dir", str(wikitext_dir)])
    assert result["plan"].solver == "seed"
    assert result["params_after"] == result["planned_params_after"]


def test_bench_metapruner_reports_both_pruners(tmp_path):
    """Torch-Pruning on the model as loaded (use_cache on) does not finish its graph even on a tiny Llama: that row
    must be a timeout; with use_cache=False it finishes (and removes other heads: query heads, not KV groups)."""
    model_dir = tmp_path / "tiny"
    make_tiny_llama(num_heads=8, num_kv_heads=2, head_dim=8, layers=3).save_pretrained(model_dir)
    target = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benches" / "bench_metapruner.py"), "--model", str(model_dir), "--ratio", "0.5",
         "--layer-start", "1", "--calib-samples", "2", "--seq-len", "8", "--timeout", "10", "--json", str(target)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    ours, cached, uncached = json.loads(target.read_text())
    assert ours["pruner"] == "layerprune.torch_pruning" and ours["status"] == "finished"
    assert ours["kv_heads"] == [2, 1, 2] and ours["q_heads"] == [8, 4, 8] and ours["params_after"] < ours["params_before"]
    assert cached["use_cache"] and cached["status"] == "timeout" and cached["note"].startswith("did not finish in 10 s")
    assert not uncached["use_cache"] and uncached["status"] == "finished"
    assert uncached["kv_heads"] == [2, 2, 2] and "other heads" in uncached["note"]
    assert "consecutive_groups" in uncached["verbatim_error"]
    assert "| layerprune.torch_pruning |" in out.stdout and "did not finish in 10 s" in out.stdout
