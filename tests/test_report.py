"""report.py and plots.py on hand-made run records: verdict arithmetic, markdown content, atomic
writes, schema check, valid PNGs."""

from __future__ import annotations

import json
import math

import pytest

from layerprune.errors import InvalidInputError
from layerprune.provenance import versions
from layerprune.report import plots
from layerprune.report import tables as report


def _layers(kv, mlp):
    return [{"layer": i, "kv_groups_kept": k, "mlp_kept": m} for i, (k, m) in enumerate(zip(kv, mlp))]


def _run(method, ratio, ppl, params, kv=(2, 2, 2), mlp=(96, 96, 96)):
    return {
        "method": method,
        "target_ratio": ratio,
        "actual_ratio": ratio,
        "actual_ratio_layers": ratio * 1.3,
        "params": params,
        "ppl": ppl,
        "tokens": 1000,
        "predicted_tokens": 992,
        "seq_len": 128,
        "size_bytes": params * 4,
        "tokens_per_s": 1234.5,
        "generations": [f"{method} says | hi\nthere", f"{method} second"],
        "seconds": {"pruning": 1.5, "eval": 2.0},
        "layers": _layers(kv, mlp),
    }


def _runs(unbalanced_ppl=20.0):
    return [
        _run("dense", 0.0, 10.0, 1000),
        _run("uniform-range", 0.2, 30.0, 800, kv=(2, 1, 2), mlp=(96, 60, 96)),
        _run("uniform", 0.2, 25.0, 800, kv=(2, 2, 2), mlp=(70, 70, 70)),
        _run("unbalanced-seed", 0.2, 24.0, 790, kv=(2, 2, 1), mlp=(90, 70, 50)),
        _run("unbalanced", 0.2, unbalanced_ppl, 800, kv=(2, 2, 1), mlp=(96, 80, 40)),
        _run("uniform", 0.3, 50.0, 700),
        _run("unbalanced", 0.3, 60.0, 700),
    ]


def test_verdict_numbers_and_quality_bar():
    entries = {v["target_ratio"]: v for v in report.verdicts(_runs())}
    v = entries[0.2]
    assert v["winner"] == "unbalanced"
    assert v["best_uniform"] == "uniform"
    assert math.isclose(v["unbalanced_vs_best_uniform"], (20.0 - 25.0) / 25.0)
    assert math.isclose(v["unbalanced_vs_seed"], (20.0 - 24.0) / 24.0)
    assert v["quality_bar_met"] is True
    # 0.3: the expected winner loses; the verdict must say so
    w = entries[0.3]
    assert w["winner"] == "uniform"
    assert math.isclose(w["unbalanced_vs_best_uniform"], 0.2)
    text = "\n".join(report.verdict_lines(report.verdicts(_runs())))
    assert "did NOT win at this ratio" in text
    assert "20.0% lower" in text  # 20 vs 25
    assert "20.0% higher" in text  # 60 vs 50


def test_quality_bar_needs_ten_percent():
    # 23.0 vs 25.0 is only 8% lower: winner, but the bar is not met
    v = report.verdicts(_runs(unbalanced_ppl=23.0))[0]
    assert v["winner"] == "unbalanced"
    assert v["quality_bar_met"] is False
    assert "**NOT met**" in "\n".join(report.verdict_lines([v]))


def test_markdown_has_table_verdict_layers_generations():
    runs = _runs()
    rep = {
        "schema": report.SCHEMA, "model": "tiny", "command": ["layerprune", "compare"],
        "versions": versions(), "settings": {"seed": 0}, "runs": runs,
        "methods": ["dense", "uniform-range", "uniform", "unbalanced-seed", "unbalanced"],
        "layer_importance": {"removal": {"attn": [0.1, 0.2, 0.3], "mlp": [1, 2, 3], "combined": [1.1, 2.2, 3.3]}},
        "prompts": ["p1", "p2"],
    }
    md = report.render_markdown(rep)
    header = "| method | target ratio | actual ratio (all / decoder) | KV-cache / FLOPs ratio | params | PPL | Δ PPL vs dense | size MB | tok/s |"
    assert header in md
    assert md.index("## Results") < md.index("## Verdict")
    assert "| uniform | 0.200 | 0.2000 / 0.2600 | - / - | 800 | 25.000 | +150.0% | 0.0 | 1234 |" in md
    assert "- **Ratio 0.2: `unbalanced` wins**" in md
    assert "| 1 | 2 / 96 | 1 / 60 | 2 / 70 | 2 / 70 | 2 / 80 |" in md  # per-layer KV / MLP at 0.2
    assert "removal combined" in md
    # generations: pipes escaped, newlines flattened, one row per model
    assert "unbalanced says \\| hi ⏎ there" in md
    assert md.count("**Prompt") == 2


def test_write_report_atomic_and_schema(tmp_path):
    rep = {"schema": report.SCHEMA, "command": ["x"], "versions": versions(), "runs": _runs(),
           "extra": float("nan")}
    json_path, md_path = report.write_report(tmp_path, rep)
    loaded = json.loads(json_path.read_text())
    assert loaded["extra"] is None  # NaN is not valid JSON
    assert all(set(report.REQUIRED_RUN_KEYS) <= set(r) for r in loaded["runs"])
    assert md_path.read_text().startswith("# layerprune compare")
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    for key in ("torch", "transformers", "torch-pruning", "layerprune", "python"):
        assert key in loaded["versions"]
    bad = dict(rep, runs=[{"method": "dense"}])
    with pytest.raises(ValueError, match="missing 'target_ratio'"):
        report.write_report(tmp_path, bad)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "r.json"
    report.write_json_atomic(target, {"a": 1})

    class Unserializable:
        pass

    with pytest.raises(InvalidInputError, match="Unserializable"):
        report.write_json_atomic(target, {"a": Unserializable()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_plots_are_valid_pngs(tmp_path):
    runs = _runs()
    paths = [
        plots.plot_importance({"removal": {"attn": [0.1, 0.3, 0.2], "mlp": [1, 2, None], "combined": [1, 2, 3]},
                               "sensitivity": {"combined": [3, 2, 1]}}, tmp_path / "importance.png"),
        plots.plot_allocation([r for r in runs if r["target_ratio"] in (0.0, 0.2)], tmp_path / "alloc.png",
                              title="ratio 0.2"),
        plots.plot_ppl_vs_ratio(runs, tmp_path / "ppl.png"),
    ]
    for path in paths:
        assert plots.is_png(path)
        assert path.stat().st_size > 5000
    with pytest.raises(ValueError, match="no pruned run"):
        plots.plot_ppl_vs_ratio([runs[0]], tmp_path / "none.png")
