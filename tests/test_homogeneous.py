"""`homogeneous`: the same KV groups and MLP channels in every layer at the exact budget (to one step per layer),
so the pruned model saves under its family's own config. The allocation against a numpy brute force over the
(g, f) pairs; `prune` and `layerprune prune --homogeneous` on a tiny Llama (GQA) and a tiny Qwen2 (biases): the
budget window, equal widths, a plain config that transformers loads without remote code, the same logits; the
refusals; a `compare` run of `uniform-homogeneous`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from families import CASES, logits, make_model, make_tokenizer, token_ids, plain_config
from hypothesis import given, settings
from hypothesis import strategies as st

from layerprune.allocation import AllocationSpec, LayerShape, allocate, target_count
from layerprune.arch import layer_shapes
from layerprune.cli import main
from layerprune.errors import InfeasibleError, InvalidInputError
from layerprune.export import MODELING_FILE, save_pruned
from layerprune.pruning import prune
from layerprune.pruning.config import method_name, solver_for, validate_against_model, validate_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAMILIES = {c.name: c for c in CASES}
LLAMA, QWEN2 = FAMILIES["llama3-gqa"], FAMILIES["qwen2-bias"]


# ---------------------------------------------------------------- the allocation against a brute force


def brute_force(spec: AllocationSpec) -> tuple[int, int, float] | None:
    """Every (g, f) allowed in every layer, from the spec's words, on a numpy grid: the pair removing within
    [T, T + L * step] (step: the smaller of one KV group and one mlp_step of channels, among the components with a
    choice) that meets the KV-cache bound, with the least objective; ties keep more KV groups, then fewer channels."""
    s, n = spec.layers[0], len(spec.layers)
    h, i = s.num_kv_heads, s.intermediate
    g = np.arange(h + 1)[:, None]
    f = np.arange(i + 1)[None, :]
    lo_a = spec.min_rate if spec.min_attn_rate is None else spec.min_attn_rate
    hi_a = spec.max_rate if spec.max_attn_rate is None else spec.max_attn_rate
    lo_m = spec.min_rate if spec.min_mlp_rate is None else spec.min_mlp_rate
    hi_m = spec.max_rate if spec.max_mlp_rate is None else spec.max_mlp_rate
    ar, mr = 1 - g / h, 1 - f / i
    min_mlp = spec.min_mlp if spec.min_mlp is not None else min(spec.mlp_step, i)
    g_ok = (g >= spec.min_kv_groups) & (ar >= lo_a - 1e-9) & (ar <= hi_a + 1e-9)
    f_ok = ((f % spec.mlp_step == 0) | (f == i)) & (f >= min_mlp) & (mr >= lo_m - 1e-9) & (mr <= hi_m + 1e-9)
    ok = g_ok & f_ok
    step = min([s.params() - s.params(h - 1, i)] * int(g_ok.sum() > 1)
               + [(s.params() - s.params(h, i - min(spec.mlp_step, i)))] * int(f_ok.sum() > 1), default=0)
    if spec.tie:
        ok &= np.abs(f / i - g / h) <= 0.5 / h + 1e-12
    per_layer = np.array([[s.params() - s.params(a, b) for b in range(i + 1)] for a in range(h + 1)])
    removed = n * per_layer
    t = target_count(spec.ratio, spec.params_total)
    ok &= (removed >= t) & (removed <= t + n * step)
    if spec.kv_cache_ratio is not None:
        kv_removed = n * 2 * (h - g) * s.head_dim * spec.kv_cache_dtype_bytes + 0 * f
        ok &= kv_removed >= target_count(spec.kv_cache_ratio, spec.kv_cache_bytes_total)
    loss = np.zeros((h + 1, i + 1))
    for l in range(n):  # summed layer by layer, as the solvers sum it
        if spec.attn_curves is not None:
            a = np.asarray(spec.attn_curves[l], dtype=np.float64)[:, None] + 0 * f
            m = np.asarray(spec.mlp_curves[l], dtype=np.float64)[np.where(f == i, math.ceil(i / spec.mlp_step),
                                                                           f // spec.mlp_step)] + 0 * g
        else:
            w = spec.importance[l]
            a = w * (1.0 - g / h) * (1.0 - g / h) + 0 * f
            m = w * (1.0 - f / i) * (1.0 - f / i) + 0 * g
        loss = loss + (a + m)
    if not ok.any():
        return None
    best = min(zip(*np.nonzero(ok)), key=lambda p: (loss[p], -p[0], p[1]))
    return int(best[0]), int(best[1]), float(loss[best])


@st.composite
def small_specs(draw):
    n = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 3))
    inter = draw(st.integers(1, 8))
    step = draw(st.integers(1, 3))
    shape = LayerShape(hidden=draw(st.integers(1, 3)), num_q_heads=hkv * draw(st.sampled_from([1, 2, 4])),
                       num_kv_heads=hkv, head_dim=draw(st.integers(1, 2)), intermediate=inter,
                       qkv_bias=draw(st.booleans()), norm_params=2)
    kw = {}
    if draw(st.booleans()):
        def curves(length):
            return [np.array(draw(st.lists(st.floats(0, 5), min_size=length, max_size=length))) for _ in range(n)]

        kw["attn_curves"], kw["mlp_curves"] = curves(hkv + 1), curves(math.ceil(inter / step) + 1)
    else:  # importance only (exact ties included: the tie-break decides)
        kw["importance"] = np.array(draw(st.lists(st.sampled_from([0.0, 1.0, 2.5]), min_size=n, max_size=n)))
    return AllocationSpec(
        ratio=draw(st.floats(0.0, 0.5)), layers=[shape] * n, extra_params=draw(st.integers(0, 30)), mlp_step=step,
        min_kv_groups=draw(st.integers(0, 1)), max_rate=draw(st.sampled_from([1.0, 0.7, 0.5])), tie=draw(st.booleans()),
        kv_cache_ratio=draw(st.one_of(st.none(), st.floats(0.01, 0.6))), **kw)


@settings(max_examples=150, deadline=None)
@given(small_specs())
def test_allocate_homogeneous_equals_a_brute_force_over_pairs(spec):
    want = brute_force(spec)
    try:
        res = allocate(spec, "homogeneous")
    except InfeasibleError as err:
        assert want is None, (want, str(err))
        assert "\n" not in str(err)
        return
    assert want is not None, res
    g, f, objective = want
    assert res.solver == "homogeneous"
    assert {(la.kv_groups_kept, la.mlp_kept) for la in res.layers} == {(g, f)}
    assert res.objective == pytest.approx(objective, rel=1e-12, abs=1e-12)
    assert res.target_removed <= res.params_removed <= res.target_removed + res.granule
    assert res.params_removed == len(spec.layers) * (spec.layers[0].params() - spec.layers[0].params(g, f))


def smollm2_like(ratio: float, **kw) -> AllocationSpec:
    shape = LayerShape(hidden=576, num_q_heads=9, num_kv_heads=3, head_dim=64, intermediate=1536, norm_params=1152)
    return AllocationSpec(ratio=ratio, layers=[shape] * 30, extra_params=49152 * 576 + 576, **kw)


def test_homogeneous_window_is_one_step_per_layer_and_no_objective_is_needed():
    res = allocate(smollm2_like(0.25), "homogeneous")  # flat: ties keep every KV group, then the fewest channels
    assert res.granule == 30 * 3 * 576  # one MLP channel per layer (smaller than a KV group)
    assert {(la.kv_groups_kept, la.mlp_kept) for la in res.layers} == {(3, 887)}
    assert res.target_removed <= res.params_removed <= res.target_removed + res.granule
    assert any("887 MLP channels" in n for n in res.notes)


@pytest.mark.parametrize("change,field", [
    ({"protected": (0,)}, "protected:"),
    ({"attn_layer_start": 3}, "attn_layer_start:"),
    ({"mlp_layer_end": 20}, "mlp_layer_end:"),
    ({"layer_rate": 0.25}, "layer_rate:"),
])  # fmt: skip
def test_allocate_homogeneous_refuses_what_makes_widths_differ(change, field):
    with pytest.raises(InvalidInputError) as err:
        allocate(smollm2_like(0.25, importance=np.ones(30), **change), "homogeneous")
    assert str(err.value).startswith(field) and "\n" not in str(err.value)


def test_allocate_homogeneous_refuses_layers_of_different_shapes():
    spec = smollm2_like(0.25, importance=np.ones(30))
    spec.layers = [*spec.layers[:5], LayerShape(576, 9, 3, 64, 1024, norm_params=1152), *spec.layers[6:]]
    with pytest.raises(InvalidInputError, match=r"^layers\[5\]:"):
        allocate(spec, "homogeneous")


def test_unreachable_window_names_the_nearest_ratios():
    # a KV group removes 12 params, an MLP channel 3: per layer {0, 3, 12, 15}; T = round(0.2 * 32) = 6, window [6, 9]
    spec = AllocationSpec(ratio=0.2, layers=[LayerShape(1, 2, 2, 3, 2, norm_params=2)], importance=np.ones(1))
    with pytest.raises(InfeasibleError, match=r"^ratio 0\.2: .*0\.093750 below and 0\.375000 above$"):
        allocate(spec, "homogeneous")


# ---------------------------------------------------------------- prune / save / reload


def check_homogeneous_folder(folder, pruned, case, report):
    """Equal widths, the budget window, a plain config transformers loads without remote code, the same logits."""
    from transformers import AutoModelForCausalLM

    shapes = layer_shapes(pruned)
    assert len({(s["num_q_heads"], s["num_kv_heads"], s["intermediate"]) for s in shapes}) == 1
    alloc = report["allocation"]
    assert alloc["solver"] == "homogeneous"
    removed = report["params_before"]["total"] - report["params_after"]["total"]
    assert alloc["target_removed"] <= removed <= alloc["target_removed"] + alloc["granule"]
    dense = layer_shapes(make_model(case))[0]
    r, hd, d = dense["num_q_heads"] // dense["num_kv_heads"], dense["head_dim"], case.kwargs["hidden_size"]
    group = d * hd * (2 * r + 2) + (hd * (r + 2) if case is QWEN2 else 0)  # q, k, v rows (+ biases), o_proj columns
    assert alloc["granule"] == len(shapes) * min(group, 3 * d)  # one KV group or MLP channel per layer
    saved = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in saved and not (folder / MODELING_FILE).exists()
    assert saved["architectures"] == [case.model_class] and saved["layerprune"]["plain"] is True
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["intermediate_size"]) == (
        shapes[0]["num_q_heads"], shapes[0]["num_kv_heads"], shapes[0]["intermediate"])
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(plain).__name__ == case.model_class
    ids = token_ids()
    torch.testing.assert_close(logits(plain, ids), logits(pruned, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [LLAMA, QWEN2], ids=["llama3-gqa", "qwen2-bias"])
@pytest.mark.parametrize("mode,refit", [("uniform", "none"), ("unbalanced", "lstsq")])
def test_prune_homogeneous_saves_the_family_config(tmp_path, case, mode, refit):
    dense = make_model(case)
    config = plain_config(ratio=0.3, mode=mode, match_params=True, homogeneous=True, layer_importance="removal",
                         calib_samples=4, calib_seq_len=16, refit=refit, refit_samples=4, refit_seq_len=16)
    result = prune(dense, None, config, calib_ids=token_ids(batch=4, length=16, seed=3),
                   refit_ids=token_ids(batch=4, length=16, seed=4) if refit != "none" else None, progress=False)
    assert result.report["method"] == ("uniform-homogeneous" if mode == "uniform" else "unbalanced-removal-homogeneous"
                                       ) + ("" if refit == "none" else f"+{refit}")
    folder = save_pruned(result.model, make_tokenizer(), tmp_path / "plain", report=result.report)
    check_homogeneous_folder(folder, result.model, case, result.report)


def test_config_refusals_are_one_line():
    base = dict(ratio=0.3, mode="uniform", match_params=True, homogeneous=True)
    for change, field in (({"protected": (0,)}, "protected:"), ({"mode": "flap"}, "mode:"),
                          ({"match_params": False}, "match_params:"),
                          ({"mode": "unbalanced", "solver": "seed"}, "solver:"), ({"homogeneous": 1}, "homogeneous:")):
        with pytest.raises(InvalidInputError) as err:
            validate_config(plain_config(**{**base, **change}))
        assert str(err.value).startswith(field) and "\n" not in str(err.value), err.value
    for change, field in (({"layer_start": 1}, "attn_layer_start/end:"), ({"mlp_layer_end": 2}, "mlp_layer_start/end:"),
                          ({"attn_layer_start": 0, "attn_layer_end": 3}, None)):
        if field is None:
            validate_against_model(plain_config(**{**base, **change}), 3)  # a range over every layer is fine
            continue
        with pytest.raises(InvalidInputError, match=field):
            validate_against_model(plain_config(**{**base, **change}), 3)
    config = plain_config(**base)
    assert solver_for(config) == "homogeneous" and method_name(config) == "uniform-homogeneous"
    assert solver_for(plain_config(ratio=0.3, homogeneous=True)) == "homogeneous"


# ---------------------------------------------------------------- `layerprune prune --homogeneous`


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, wikitext_dir):
    out = {}
    for case in (LLAMA, QWEN2):
        folder = tmp_path_factory.mktemp(case.name)
        make_model(case).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        out[case.name] = folder
    return out


def _argv(model, out, data_dir, *extra):
    return ["prune", "--model", str(model), "--ratio", "0.3", "--out", str(out), "--data-dir", str(data_dir),
            "--calib-samples", "3", "--calib-seq-len", "24", "--refit-samples", "3", "--refit-seq-len", "24",
            "--no-progress", "--homogeneous", *extra]


@pytest.mark.parametrize("case,extra", [
    (LLAMA, ("--mode", "uniform", "--match-params", "--refit", "none")),
    (QWEN2, ()),  # the defaults: unbalanced, sensitivity curves, refit lstsq
], ids=["llama3-gqa-uniform", "qwen2-bias-unbalanced"])  # fmt: skip
def test_cli_homogeneous_saves_the_family_config(family_dirs, wikitext_dir, tmp_path, capsys, case, extra):
    from layerprune.cli.prune import add_parser, config_from_args
    from layerprune.models import load_model

    out = tmp_path / "pruned"
    argv = _argv(family_dirs[case.name], out, wikitext_dir, *extra)
    assert main(argv) == 0
    assert "config.json is not" not in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["homogeneous"] is True
    # the pruned model in memory, as the CLI made it: the same config on the same dense model and text
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    config = config_from_args(parser.parse_args(argv))
    dense, tokenizer = load_model(family_dirs[case.name])
    result = prune(dense, tokenizer, config, progress=False)
    assert result.report["allocation"]["kv_cache_bytes_after"] == report["allocation"]["kv_cache_bytes_after"]
    check_homogeneous_folder(out, result.model, case, report)


def test_cli_homogeneous_with_an_output_bias_says_why_the_config_is_not_plain(family_dirs, wikitext_dir, tmp_path,
                                                                               capsys):
    out = tmp_path / "bias"
    assert main(_argv(family_dirs[LLAMA.name], out, wikitext_dir, "--mode", "uniform", "--match-params",
                      "--refit", "lstsq-bias")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "config.json" in line]
    assert len(err) == 1 and "compensation bias" in err[0], err
    saved = json.loads((out / "config.json").read_text())
    assert "auto_map" in saved and (out / MODELING_FILE).is_file()
    shapes = {(a, b, c) for a, b, c in zip(saved["layer_num_attention_heads"], saved["layer_num_key_value_heads"],
                                           saved["layer_intermediate_sizes"])}
    assert len(shapes) == 1


@pytest.mark.parametrize("extra,match", [
    (("--protected", "0"), "protected:"),
    (("--mode", "uniform"), "match_params:"),
    (("--mode", "flap"), "mode:"),
    (("--solver", "seed"), "solver:"),
    (("--layer-start", "1"), "layer_start/end:"),
])  # fmt: skip
def test_cli_homogeneous_refusals_exit_2_with_one_line(family_dirs, wikitext_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_argv(family_dirs[LLAMA.name], out, wikitext_dir, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


# ---------------------------------------------------------------- `compare` with uniform-homogeneous


def test_compare_runs_uniform_homogeneous(tmp_path, wikitext_dir):
    from conftest import make_tiny_llama

    from layerprune.compare import run as compare_mod
    from layerprune.compare.settings import METHOD_NOTES, METHODS, REFIT_METHODS, prune_config
    from layerprune.report import tables

    assert "uniform-homogeneous" in METHODS and "uniform-homogeneous" in REFIT_METHODS
    assert "uniform-homogeneous" in METHOD_NOTES and "uniform-homogeneous" in tables.UNIFORM_METHODS

    class Bytes:  # bytes -> ids in [1, 128); enough for evaluation, calibration, generation and saving
        eos_token_id = 0

        class _Encoding:
            def __init__(self, ids):
                self.input_ids = ids

        def __call__(self, text, return_tensors="pt"):
            return self._Encoding(torch.tensor([[(b & 0x7F) or 1 for b in text.encode("utf-8")]], dtype=torch.long))

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(int(i)) for i in ids)

        def save_pretrained(self, path):
            (Path(path) / "tokenizer.txt").write_text("bytes\n")

    model = make_tiny_llama(layers=4, seed=1)
    settings = compare_mod.CompareSettings(
        ratios=(0.25,), methods=("dense", "uniform-homogeneous"), max_tokens=320, seq_len=32,
        data_dir=str(wikitext_dir), calib_samples=4, calib_seq_len=32, prompts=("The cat",), max_new_tokens=2, throughput_repeats=1,
        refit_samples=4, refit_seq_len=32)
    config = prune_config("uniform-homogeneous", 0.25, settings, 4)
    assert (config.mode, config.match_params, config.homogeneous, config.refit) == ("uniform", True, True, "lstsq")
    rep = compare_mod.compare(model, Bytes(), settings, tmp_path, model_name="tiny", progress=False)
    (run,) = [r for r in rep["runs"] if r["method"] == "uniform-homogeneous"]
    assert run["config"]["homogeneous"] is True and math.isfinite(run["ppl"])
    assert len({(la["kv_groups_kept"], la["mlp_kept"]) for la in run["layers"]}) == 1
    dense = next(r for r in rep["runs"] if r["method"] == "dense")
    target = target_count(0.25, dense["params"])
    assert target <= dense["params"] - run["params"] <= target + run["allocation_granule"]
    assert "| uniform-homogeneous | 0.250 |" in (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "models" / "0.25" / "uniform-homogeneous" / "config.json").read_text())
    assert "auto_map" not in saved and saved["architectures"] == ["LlamaForCausalLM"]  # refit lstsq: no bias
