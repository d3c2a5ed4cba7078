"""`layerprune compare` end to end on a tiny random Llama with a character tokenizer over the real
WikiText-2 files: report schema, verdict, plots, reuse of finished runs (also after a crash), equal
parameter counts, the uniform-range rate search, and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from layerprune.compare import matching, settings as settings_mod
from layerprune.compare import run as compare_mod
from layerprune.importance import LayerImportance
from layerprune.pruning import pipeline
from layerprune.report import plots
from layerprune.report import tables as report
from layerprune.errors import InfeasibleError, InvalidInputError

from layerprune.compare.settings import METHODS  # noqa: E402


class CharTokenizer:
    """Bytes -> ids in [1, 128) (0 is EOS); enough for data.eval_tokens / calibration_batch /
    generate_greedy / save_pruned."""

    eos_token_id = 0

    class _Encoding:
        def __init__(self, ids: torch.Tensor):
            self.input_ids = ids

    def __call__(self, text, return_tensors="pt"):
        ids = [(b & 0x7F) or 1 for b in text.encode("utf-8")]
        return self._Encoding(torch.tensor([ids], dtype=torch.long))

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)

    def save_pretrained(self, path):
        (Path(path) / "char_tokenizer.json").write_text("{}\n")


def _settings(data_dir, ratios=(0.2, 0.3), **kw):
    base = dict(ratios=ratios, max_tokens=640, seq_len=32, data_dir=str(data_dir), calib_samples=4, calib_seq_len=32,
                prompts=("The cat", "In 1990"), max_new_tokens=3, throughput_repeats=1)
    base.update(kw)
    return compare_mod.CompareSettings(**base)


def _count_calls(monkeypatch):
    calls = {"prune": 0, "importance": 0, "measure": 0}
    real_prune, real_li, real_measure = pipeline.prune, compare_mod.compute_layer_importance, compare_mod.measure_model

    def prune(*a, **k):
        calls["prune"] += 1
        return real_prune(*a, **k)

    def li(*a, **k):
        calls["importance"] += 1
        return real_li(*a, **k)

    def measure(*a, **k):
        calls["measure"] += 1
        return real_measure(*a, **k)

    monkeypatch.setattr(pipeline, "prune", prune)
    monkeypatch.setattr(compare_mod, "compute_layer_importance", li)
    monkeypatch.setattr(compare_mod, "measure_model", measure)
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory, wikitext_dir):
    """One full comparison at two ratios (shared by the read-only checks below)."""
    out = tmp_path_factory.mktemp("compare")
    model = make_tiny_llama(layers=6, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = compare_mod.compare(model, CharTokenizer(), _settings(wikitext_dir, methods=METHODS, search_generations=2),
                              out, model_name="tiny",
                              command=["layerprune", "compare", "--test"], progress=False)
    return out, rep, model, before


def test_report_json_schema(finished):
    out, rep, _, _ = finished
    data = json.loads((out / "report.json").read_text())
    assert data["schema"] == report.SCHEMA
    assert data["command"] == ["layerprune", "compare", "--test"]
    for key in ("python", "torch", "transformers", "torch-pruning", "layerprune"):
        assert key in data["versions"]
    runs = data["runs"]
    assert sorted((r["method"], r["target_ratio"]) for r in runs) == sorted(
        [("dense", 0.0)] + [(m, r) for r in (0.2, 0.3) for m in METHODS[1:]]
    )
    tokens = {r["tokens"] for r in runs}
    assert tokens == {640}  # every model on the same tokens
    for r in runs:
        for key in report.REQUIRED_RUN_KEYS + ("actual_ratio_layers", "size_bytes", "tokens_per_s", "generations",
                                               "layers", "seconds"):
            assert key in r, (r["method"], key)
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert len(r["generations"]) == 2
        assert len(r["layers"]) == 6
        if r["method"] != "dense":
            assert r["params"] < runs[0]["params"]
            assert math.isclose(r["actual_ratio"], 1 - r["params"] / runs[0]["params"])
            assert set(r["seconds"]) >= {"layer_importance", "scoring", "allocation", "pruning", "eval"}
            # saved with save_pruned; the size is that of the safetensors file
            folder = out / "models" / compare_mod.ratio_key(r["target_ratio"]) / r["method"]
            assert r["size_bytes"] == compare_mod.safetensors_bytes(folder) > 0
    assert set(data["layer_importance"]) == {"removal", "sensitivity", "sensitivity-obs", "reconstruction", "depth"}
    # the layer importance cache is on disk too
    assert (out / "layer_importance" / "removal.json").is_file()
    assert (out / "layer_importance" / "sensitivity.json").is_file()


def test_input_model_untouched(finished):
    _, _, model, before = finished
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_report_md_table_and_verdict(finished):
    out, rep, _, _ = finished
    md = (out / "report.md").read_text()
    assert md.index("## Results") < md.index("## Verdict")
    assert "| method | target ratio | actual ratio (all / decoder) | KV-cache / FLOPs ratio | params | PPL | Δ PPL vs dense | size MB | tok/s |" in md
    for v in rep["verdicts"]:
        winner = min((r for r in rep["runs"] if r["method"] != "dense" and r["target_ratio"] == v["target_ratio"]),
                     key=lambda r: r["ppl"])
        assert f"**Ratio {v['target_ratio']:g}: `{winner['method']}` wins**" in md
        assert "Quality bar" in md
        if winner["method"] != "unbalanced":
            assert "did NOT win" in md
    assert "## Kept KV groups / MLP channels per layer, target ratio 0.2" in md
    assert "**Prompt 1:**" in md


def test_plots_exist_and_are_png(finished):
    out, rep, _, _ = finished
    assert rep["plots"] == ["importance.png", "allocation_0.2.png", "allocation_0.3.png", "ppl_vs_ratio.png"]
    for name in rep["plots"]:
        path = out / name
        assert plots.is_png(path) and path.stat().st_size > 5000


def test_uniform_and_unbalanced_same_params_within_granule(finished):
    _, rep, model, _ = finished
    matches = rep["param_match"]
    assert [m["target_ratio"] for m in matches] == [0.2, 0.3]
    dense = rep["runs"][0]["params"]
    for m in matches:
        assert m["within_granule"], m
        assert abs(m["params_a"] - m["params_b"]) <= m["granule"] <= matching.granule_params(model)
        # and both land on the budget: removed in [target, target + granule]
        for p in (m["params_a"], m["params_b"]):
            removed = dense - p
            assert m["target_ratio"] * dense - 1 <= removed <= m["target_ratio"] * dense + m["granule"]


def test_uniform_range_lands_closest_to_target(finished):
    _, rep, model, _ = finished
    compare_mod.validate_settings(_settings(Path(".")))
    dense = rep["runs"][0]["params"]
    for run in rep["runs"]:
        if run["method"] != "uniform-range":
            continue
        assert run["config"]["layer_start"] == 3 and run["config"]["layer_end"] == 5  # [3, L-1) for L = 6
        assert [l["kv_groups_kept"] for l in run["layers"][:3]] == [2, 2, 2]  # first three layers and last kept
        assert run["layers"][5]["mlp_kept"] == 96
        target = (1 - run["target_ratio"]) * dense
        # counted independently of the allocation code: the pruned model is what the floors give at its rate ...
        assert run["params"] == _range_params(model, run["range_rate"], 3, 5)
        # ... and no rate on a fine grid lands closer to the target
        best = min(abs(_range_params(model, r, 3, 5) - target) for r in np.linspace(0.001, 0.999, 200))
        assert abs(run["params"] - target) <= best


def _range_params(model, rate, start, end):
    """Parameters left by LLM-Pruner's floors at `rate` on layers [start, end), counted from the modules'
    tensors (not the allocation's formula): floor(rate * n) KV groups and channels go, one of each stays."""
    total = sum(p.numel() for p in model.parameters())
    head_dim = model.config.head_dim
    for layer in model.model.layers[start:end]:
        attn, mlp = layer.self_attn, layer.mlp
        groups = attn.k_proj.out_features // head_dim
        per_group = sum(m.weight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)) // groups
        channels = mlp.gate_proj.out_features
        per_channel = sum(m.weight.numel() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)) // channels
        total -= min(math.floor(rate * groups), groups - 1) * per_group
        total -= min(math.floor(rate * channels), channels - 1) * per_channel
    return total


def test_unbalanced_seed_is_matched_in_parameter_count(finished):
    """The seed mapping misses a requested ratio (clip, minimum effective rate, floors); compare picks the
    request that lands it closest to the target, so no request on a fine grid does better."""
    out, rep, model, _ = finished
    settings = compare_mod.validate_settings(_settings(Path(".")))
    removal = LayerImportance.from_json(
        json.loads((out / "layer_importance" / "removal.json").read_text())["layer_importance"])
    dense = rep["runs"][0]["params"]
    for run in rep["runs"]:
        if run["method"] != "unbalanced-seed":
            continue
        target = (1 - run["target_ratio"]) * dense
        assert run["config"]["ratio"] != run["target_ratio"]  # the request differs from the target
        # the search's count is the real pruned model's count at the chosen request
        chosen = compare_mod.prune_config("unbalanced-seed", run["config"]["ratio"], settings, 6)
        assert matching.allocated_params(model, chosen, removal) == run["params"]
        grid = []
        for r in np.linspace(0.001, 0.999, 200):
            try:
                config = compare_mod.prune_config("unbalanced-seed", r, settings, 6)
                grid.append(abs(matching.allocated_params(model, config, removal) - target))
            except InfeasibleError:
                pass
        assert abs(run["params"] - target) <= min(grid)


def test_range_rate_search_on_step_function():
    model = make_tiny_llama(layers=6)
    total = sum(p.numel() for p in model.parameters())
    settings = compare_mod.validate_settings(compare_mod.CompareSettings(ratios=(0.25,)))
    steps = [(k / 10, total - k * 1000) for k in range(11)]  # removes 1000 params per 0.1 of rate

    def params_after(rate):
        return min(p for r, p in steps if r <= rate)

    rate, params = matching.range_rate_for_ratio(model, 4400 / total, settings, params_after)
    assert params == total - 4000  # target removes 4400: 4000 is closer than 5000
    assert 0.4 <= rate < 0.5


def test_reuse_skips_finished_runs_and_resumes_after_crash(tmp_path, wikitext_dir, monkeypatch):
    model = make_tiny_llama(layers=6, seed=2)
    settings = _settings(wikitext_dir, ratios=(0.25,), methods=("dense", "uniform", "unbalanced-seed",
                                                                  "unbalanced-norefit"), prompts=(), save_models=False)

    # crash (Ctrl-C) while pruning the third method: the runs finished before it are on disk
    real_prune = pipeline.prune
    started = []

    def crashing(*a, **k):
        started.append(a[2].mode)
        if len(started) == 3:
            raise KeyboardInterrupt
        return real_prune(*a, **k)

    monkeypatch.setattr(pipeline, "prune", crashing)
    with pytest.raises(KeyboardInterrupt):
        compare_mod.compare(model, CharTokenizer(), settings, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "runs" / "0.25").iterdir()) == ["unbalanced-seed.json", "uniform.json"]
    assert (tmp_path / "runs" / "dense.json").is_file()
    assert not (tmp_path / "report.json").exists()
    # layer importance is persisted as soon as it is computed (sensitivity came just before the crash)
    assert sorted(p.name for p in (tmp_path / "layer_importance").iterdir()) == ["removal.json", "sensitivity.json"]
    assert not list(tmp_path.rglob("*.tmp"))

    monkeypatch.setattr(pipeline, "prune", real_prune)
    counting = _count_calls(monkeypatch)
    rep1 = compare_mod.compare(model, CharTokenizer(), settings, tmp_path, progress=False)
    assert counting["prune"] == 1  # only `unbalanced-norefit` was left
    assert counting["measure"] == 1  # dense not re-evaluated
    assert counting["importance"] == 0  # both were cached before the crash

    counting = _count_calls(monkeypatch)
    rep2 = compare_mod.compare(model, CharTokenizer(), settings, tmp_path, progress=False)
    assert counting == {"prune": 0, "importance": 0, "measure": 0}
    assert [(r["method"], r["ppl"]) for r in rep2["runs"]] == [(r["method"], r["ppl"]) for r in rep1["runs"]]
    assert set(rep2["layer_importance"]) == {"removal", "sensitivity"}

    # other settings (a different eval budget) are not mixed with the stored runs
    counting = _count_calls(monkeypatch)
    compare_mod.compare(model, CharTokenizer(), dict_replace(settings, max_tokens=320), tmp_path, progress=False)
    assert counting["prune"] == 3 and counting["measure"] == 4
    assert counting["importance"] == 0  # layer importance does not depend on the test tokens


def dict_replace(settings, **kw):
    import dataclasses

    return dataclasses.replace(settings, **kw)


def test_layer_importance_json_round_trip(tmp_path):
    from layerprune.importance import LayerImportance

    li = LayerImportance(method="sensitivity", attn=np.array([0.1, 0.2]), mlp=np.array([1.0, 2.0]),
                         combined=np.array([1.1, 2.2]), attn_curves=[np.array([1.0, 0.5, 0.0])] * 2,
                         mlp_curves=[np.linspace(2, 0, 5)] * 2, mlp_step=24, base_loss=3.0, seconds=1.5)
    back = LayerImportance.from_json(json.loads(json.dumps(li.to_json(full_curves=True))))
    assert back.method == "sensitivity" and back.mlp_step == 24 and back.base_loss == 3.0
    for name in ("attn", "mlp", "combined"):
        np.testing.assert_array_equal(getattr(back, name), getattr(li, name))
    for a, b in zip(back.mlp_curves + back.attn_curves, li.mlp_curves + li.attn_curves):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0.2,abc", "'abc' is not a number"),
        ("0.2,,0.3", "comma-separated list"),
        ("0.2,1.5", "strictly between 0 and 1"),
        ("0,0.2", "strictly between 0 and 1"),
        ("0.2,0.2", "duplicate ratio"),
        ("nan", "strictly between 0 and 1"),
    ],
)
def test_bad_ratio_lists(text, message):
    with pytest.raises(InvalidInputError, match=message):
        settings_mod.parse_ratios(text)


def test_cli_bad_input_one_line_before_loading(tmp_path, capsys, monkeypatch):
    from layerprune import cli, models

    def never(*a, **k):
        raise AssertionError("the model must not be loaded for bad arguments")

    monkeypatch.setattr(models, "load_model", never)
    for argv, message in (
        (["--ratios", "0.2,abc"], "'abc' is not a number"),
        (["--ratio", "1.2"], "strictly between 0 and 1"),
        (["--ratio", "0.2", "--methods", "uniform,magic"], "unknown method 'magic'"),
        (["--ratio", "0.2", "--max-tokens", "16"], "smaller than one window"),
        ([], "give --ratio R or --ratios"),
    ):
        code = cli.main(["compare", "--model", "smollm2-135m", "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and err[0].startswith("layerprune compare: error:") and message in err[0], err


def test_methods_list_always_has_dense():
    assert settings_mod.parse_methods("unbalanced,uniform") == ("dense", "uniform", "unbalanced")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_code_or_library_change_invalidates_the_store_and_fresh_recomputes(tmp_path, wikitext_dir, monkeypatch):
    from layerprune.compare import store

    model = make_tiny_llama(layers=4, seed=3)
    settings = _settings(wikitext_dir, ratios=(0.25,), methods=("dense", "uniform", "unbalanced"), prompts=(),
                         save_models=False)
    compare_mod.compare(model, CharTokenizer(), settings, tmp_path, progress=False)
    counting = _count_calls(monkeypatch)
    compare_mod.compare(model, CharTokenizer(), settings, tmp_path, progress=False)
    assert counting == {"prune": 0, "importance": 0, "measure": 0}
    # another layerprune source tree: nothing is reused
    monkeypatch.setattr(store, "source_digest", lambda: "0123456789abcdef")
    counting = _count_calls(monkeypatch)
    compare_mod.compare(model, CharTokenizer(), settings, tmp_path, progress=False)
    assert counting == {"prune": 2, "importance": 1, "measure": 3}
    # another transformers version: nothing is reused either
    real_versions = store.versions
    monkeypatch.setattr(store, "versions", lambda: {**real_versions(), "transformers": "0.0.1"})
    counting = _count_calls(monkeypatch)
    compare_mod.compare(model, CharTokenizer(), settings, tmp_path, progress=False)
    assert counting == {"prune": 2, "importance": 1, "measure": 3}
    # --fresh recomputes although everything matches
    counting = _count_calls(monkeypatch)
    compare_mod.compare(model, CharTokenizer(), dict_replace(settings, fresh=True), tmp_path, progress=False)
    assert counting == {"prune": 2, "importance": 1, "measure": 3}


def test_report_names_both_texts_and_a_user_file_is_not_calibrated_on(tmp_path, wikitext_dir):
    """--dataset FILE.txt evaluates the file; calibration still comes from WikiText-2 valid, and the report says so."""
    text = tmp_path / "mine.txt"
    text.write_text((wikitext_dir / "test.txt").read_text()[:20_000])
    model = make_tiny_llama(layers=3, seed=4)
    settings = _settings(wikitext_dir, ratios=(0.25,), methods=("dense", "uniform"), prompts=(), save_models=False,
                         dataset=str(text))
    rep = compare_mod.compare(model, CharTokenizer(), settings, tmp_path / "out", progress=False)
    texts = rep["settings"]["texts"]
    assert texts["evaluation"]["file"] == str(text.resolve()) and texts["evaluation"]["split"] is None
    assert texts["calibration"]["file"] == str((wikitext_dir / "valid.txt").resolve())
    assert texts["calibration"]["split"] == "valid"
    run = next(r for r in rep["runs"] if r["method"] == "uniform")
    pruned_report = json.loads((tmp_path / "out" / "runs" / "0.25" / "uniform.json").read_text())
    assert pruned_report["config"]["calib_dataset"] == "wikitext2" and run["tokens"] == 640


@pytest.mark.parametrize("case", ["same-file", "copy-of-evaluated", "test-split-by-path"])
def test_calibrating_on_the_evaluated_text_is_refused(tmp_path, wikitext_dir, capsys, monkeypatch, case):
    from layerprune import cli, models

    def never(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(models, "load_model", never)
    text = tmp_path / "mine.txt"
    text.write_text((wikitext_dir / "test.txt").read_text()[:5_000])
    copy = tmp_path / "copy.txt"
    copy.write_text(text.read_text())
    test_copy = tmp_path / "test-copy.txt"
    test_copy.write_text((wikitext_dir / "test.txt").read_text())
    argv = {
        "same-file": ["--dataset", str(text), "--calib-dataset", str(text)],
        "copy-of-evaluated": ["--dataset", str(text), "--calib-dataset", str(copy)],
        "test-split-by-path": ["--calib-dataset", str(test_copy)],
    }[case]
    code = cli.main(["compare", "--model", "smollm2-135m", "--ratio", "0.2", "--out", str(tmp_path / "o"),
                     "--data-dir", str(wikitext_dir), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is the evaluated text" in err[0], err
    assert not (tmp_path / "o").exists()
