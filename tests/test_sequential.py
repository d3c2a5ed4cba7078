"""Layer-by-layer pruning (`prune --sequential`, `layerprune.export.prune_checkpoint`) on tiny sharded checkpoints.

* The same result as the in-memory `prune` on every family, for five forward-only routes: the same kept KV
  groups and channels, layer importance, allocation and refit errors; the written tensors equal the in-memory
  pruned model's, every other file is `save_pruned`'s, and the folder reloads (layerprune, and plain
  transformers with remote code) with its logits.
* Spilled hidden states change nothing.
* Never more than two decoder layers' parameters alive at once (live `nn.Parameter` bytes, counted at every
  parameter creation, module call, tensor read and tensor write).
* An interrupted run leaves no output folder; a missing shard or a truncated file is one error line.
* Gradient importance is refused in one line; the CLI switches to layer by layer past --max-memory and prunes
  its own copy in place otherwise.
"""

from __future__ import annotations

import json
import math
import os
import site
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from families import BLOCK_LAYERPRUNE, CASE_IDS, CASES, logits, make_model, make_tokenizer, token_ids, plain_config

from layerprune.errors import InternalError, InvalidInputError, ModelError
from layerprune.export import prune_checkpoint, save_pruned
from layerprune.models import load_model, load_pruned
from layerprune.models.checkpoint import SafetensorsCheckpoint
from layerprune.pruning import prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFIT_BATCH = dict(refit_samples=9, refit_seq_len=12)
SETTINGS = {
    # two passes: Block Influence, Wanda scores
    "activation": dict(ratio=0.2, layer_importance="activation", importance="activation"),
    # two passes: removal (perturbed copies carried to the head), magnitude scores, perplexity metric
    "removal": dict(ratio=0.2, layer_importance="removal", importance="l1", removal_metric="ppl", solver="greedy"),
    # two passes: sensitivity curves after the refit, on a subset; refit with error correction
    "sensitivity-refit": dict(ratio=0.2, layer_importance="sensitivity", importance="activation", curve_samples=3,
                              refit="lstsq", **REFIT_BATCH),
    # one pass: uniform at the exact budget, two iterative steps rescored in between, bias refit on the inputs
    # of the unrefit model
    "uniform-iterative": dict(ratio=0.25, mode="uniform", match_params=True, importance="activation",
                              iterative_steps=2, refit="lstsq-bias", refit_error_correction=False, **REFIT_BATCH),
    # two passes: sensitivity curves whose points, and the pruning, are chosen by structured OBS
    "sensitivity-obs": dict(ratio=0.2, layer_importance="sensitivity", importance="obs", refit="lstsq", **REFIT_BATCH),
    # one pass: SlimGPT's depth schedule (no data), OBS selection and refit
    "depth-obs": dict(ratio=0.25, layer_importance="depth", importance="obs", refit="lstsq", **REFIT_BATCH),
    # one pass: uniform, OBS selection and refit
    "uniform-obs": dict(ratio=0.25, mode="uniform", match_params=True, importance="obs", refit="lstsq", **REFIT_BATCH),
    # two passes: FLAP's fluctuation scores on the refit batch, its global threshold, bias compensation
    "flap": dict(ratio=0.25, mode="flap", refit="bias", refit_error_correction=False, **REFIT_BATCH),
    # two passes: FLAP without compensation (the scores still come from the refit batch)
    "flap-plain": dict(ratio=0.2, mode="flap", refit="none", **REFIT_BATCH),
    # one pass: LLM-Pruner's per-layer rate, the same widths everywhere (saved under the family's own config)
    "uniform-rate": dict(ratio=0.4, mode="uniform", importance="l2"),
}


def _write_dense(case, folder: Path, shard: str = "40KB") -> Path:
    make_model(case).save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every family as a sharded checkpoint (transformers' own save, shards of at most 40 kB)."""
    root = tmp_path_factory.mktemp("dense")
    return {case.name: _write_dense(case, root / case.name) for case in CASES}


def _batches():
    return token_ids(batch=4, length=16, seed=3), token_ids(batch=9, length=12, seed=5)


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _comparable(report: dict) -> dict:
    """The parts of a report that must not depend on the path taken (every wall time left out)."""
    keep = ("method", "params_before", "params_after", "actual_ratio", "actual_ratio_layers", "family", "layers",
            "allocation", "calibration", "layer_importance", "refit", "kv_cache_bytes_per_token", "flops_per_token")
    return _without_times({k: report[k] for k in keep})


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sequential_equals_in_memory(tmp_path, dense_dirs, case, setting):
    dense_dir = dense_dirs[case.name]
    calib, refit_ids = _batches()
    config = plain_config(**SETTINGS[setting], calib_samples=4)
    model, _ = load_model(dense_dir, require_tokenizer=False)
    memory = prune(model, None, config, calib_ids=calib, refit_ids=refit_ids, progress=False)
    out, result = prune_checkpoint(dense_dir, config, tmp_path / "seq", calib_ids=calib, refit_ids=refit_ids,
                                   progress=False, max_shard_bytes=60_000)

    assert _comparable(result.report) == _comparable(memory.report)
    one_pass = SETTINGS[setting].get("mode") == "uniform" or SETTINGS[setting].get("layer_importance") == "depth"
    assert result.report["sequential"]["passes"] == (1 if one_pass else 2)
    # the tensors written are the in-memory pruned model's, bit for bit, in several shards with an index
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    want = {k: v for k, v in memory.model.state_dict().items() if not (k == "lm_head.weight" and
                                                                       memory.model.config.tie_word_embeddings)}
    got = _folder_tensors(out)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # the folder is save_pruned's: the same files beside the weights, the same config, and the same logits
    reference = save_pruned(memory.model, None, tmp_path / "mem", report=memory.report)
    others = sorted(p.name for p in out.iterdir() if "safetensors" not in p.name)
    assert others == sorted(p.name for p in reference.iterdir() if "safetensors" not in p.name)
    assert json.loads((out / "config.json").read_text()) == json.loads((reference / "config.json").read_text())
    for name in set(others) - {"config.json", "report.json"}:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    loaded, _ = load_pruned(out)
    ids = token_ids(seed=7)
    torch.testing.assert_close(logits(loaded, ids), logits(memory.model, ids), atol=1e-6, rtol=0)


def _close_floats(value, rel: float, abs: float = 1e-12):
    """``value`` with every float replaced by an approx within ``rel`` or ``abs`` (ints, strings and shapes stay
    exact)."""
    if isinstance(value, dict):
        return {k: _close_floats(v, rel, abs) for k, v in value.items()}
    if isinstance(value, list):
        return [_close_floats(v, rel, abs) for v in value]
    if isinstance(value, float):
        return pytest.approx(value, rel=rel, abs=abs)
    return value


def _separated_layers(case, folder: Path) -> Path:
    """``case``'s tiny model with layer l's o_proj and down_proj scaled by 1 + l/2: the random layers of a tiny
    model are statistically alike, so their importances tie to a few ulps; scaled, they are apart by far more
    than float rounding and every solver's plan is the same under either engine's rounding."""
    model = make_model(case)
    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            layer.self_attn.o_proj.weight.mul_(1 + l / 2)
            layer.mlp.down_proj.weight.mul_(1 + l / 2)
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


@pytest.mark.parametrize("block_rows", [7, 64, 10_000])
def test_loss_from_head_row_blocks_equals_the_cross_entropy_of_the_whole_logits(block_rows, monkeypatch):
    """The streamed log-sum-exp over blocks of the head's rows (and over chunks of positions: a tiny logits
    budget here) against torch's cross-entropy of the whole logits, computed directly from the model."""
    from layerprune.models import layer_calls

    case = next(c for c in CASES if c.name == "llama2-mha")
    model = make_model(case).eval()
    ids = token_ids(batch=3, length=11, seed=4)
    with torch.no_grad():
        hidden = torch.randn(3, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
        logits = model.lm_head(model.model.norm(hidden[:, :-1])).float()
        want = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
        weight = model.lm_head.weight.detach()

        def blocks():
            for start in range(0, weight.shape[0], block_rows):
                yield start, weight[start:start + block_rows]

        monkeypatch.setattr(layer_calls, "LOGITS_BYTES", 4 * 5 * block_rows)  # five positions a chunk
        streamed = layer_calls.head_loss(model, hidden, ids, head_blocks=blocks)
        whole = layer_calls.head_loss(model, hidden, ids)
    assert streamed == pytest.approx(want, rel=1e-6) and whole == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("setting", ["activation", "removal"])
def test_head_read_in_row_blocks_changes_nothing(tmp_path, monkeypatch, setting):
    """A head matrix heavier than two layers is never held whole: the losses come from logits assembled block by
    block (blocks of a few rows here). They equal the in-memory losses to float rounding (not bit for bit: see
    the test above), and on layers whose importances differ by more than rounding, the plan is the same."""
    from layerprune.pruning import sequential

    monkeypatch.setattr(sequential, "RESIDENT_HEAD_LAYERS", 0)
    monkeypatch.setattr(sequential, "ROW_BLOCK_BYTES", 1000)
    calib, _ = _batches()
    config = plain_config(**SETTINGS[setting], calib_samples=4)
    for case in (c for c in CASES if c.name in ("llama2-mha", "qwen2-bias")):  # an untied head, a tied one
        dense_dir = _separated_layers(case, tmp_path / f"{case.name}-dense")
        model, _ = load_model(dense_dir, require_tokenizer=False)
        memory = prune(model, None, config, calib_ids=calib, progress=False)
        _, result = prune_checkpoint(dense_dir, config, tmp_path / f"{case.name}-{setting}", calib_ids=calib,
                                     progress=False)
        got, want = _comparable(result.report), _comparable(memory.report)
        # float32 losses summed in another order: |d loss| <= 1e-6 (relative); a perplexity increase is a
        # difference of two perplexities near exp(base), so its rounding is relative to exp(base), not to itself
        base = want["layer_importance"]["base_loss"]
        slack = 2e-6 * math.exp(base) if SETTINGS[setting].get("removal_metric") == "ppl" else 1e-12
        assert _close_floats(got, 1e-5, slack) == want, case.name  # the same plan; the importances to rounding


def test_spilled_hidden_states_change_nothing(tmp_path, dense_dirs):
    """A zero RAM budget puts every hidden-state stream in a file: the same tensors come out. The default budget
    (half of what two layers and the head leave of a quarter of the checkpoint) spills a tiny model's too."""
    calib, refit_ids = _batches()
    dense_dir = dense_dirs["llama3-gqa"]
    for setting in ("removal", "sensitivity-refit"):
        config = plain_config(**SETTINGS[setting], calib_samples=4)
        runs = []
        for budget in (2**40, 0):
            out, result = prune_checkpoint(dense_dir, config, tmp_path / f"{setting}-{budget}", calib_ids=calib,
                                           refit_ids=refit_ids, hidden_budget_bytes=budget, progress=False)
            runs.append((_folder_tensors(out), result.report["sequential"]["hidden_states"]))
            assert not list(out.rglob(".scratch")) and not list(out.rglob("*.bin"))
        (ram, ram_stats), (spilled, spill_stats) = runs
        assert ram_stats["spilled_bytes"] == 0 and spill_stats["peak_ram_bytes"] == 0
        assert spill_stats["spilled_streams"] > 4 and spill_stats["spilled_bytes"] > 0
        assert ram.keys() == spilled.keys() and all(torch.equal(ram[k], spilled[k]) for k in ram)
        _, default = prune_checkpoint(dense_dir, config, tmp_path / f"{setting}-default", calib_ids=calib,
                                      refit_ids=refit_ids, progress=False)
        assert default.report["sequential"]["hidden_states"]["spilled_bytes"] > 0


# ---------------------------------------------------------------------------------------------------------
# memory: live parameter bytes


class _LiveParameters:
    """Every nn.Parameter created while installed (weakly held), and the most bytes alive at once among those
    outside the embedding / head, sampled whenever a parameter is made, a module is called, or a tensor is read
    from the checkpoint or written to the output."""

    def __init__(self, monkeypatch, excluded_shape: tuple[int, ...]) -> None:
        self.live: weakref.WeakSet = weakref.WeakSet()
        self.excluded_shape = excluded_shape
        self.peak = 0
        original_new = torch.nn.Parameter.__new__

        def new(cls, *args, **kwargs):
            param = original_new(cls, *args, **kwargs)
            self.live.add(param)
            self.sample()
            return param

        monkeypatch.setattr(torch.nn.Parameter, "__new__", staticmethod(new))
        original_read = SafetensorsCheckpoint.read

        def read(checkpoint, *args, **kwargs):
            tensor = original_read(checkpoint, *args, **kwargs)
            self.live.add(tensor)  # a plain tensor the engine might hold without wrapping it
            self.sample()
            return tensor

        monkeypatch.setattr(SafetensorsCheckpoint, "read", read)
        from layerprune.export.streamed import SafetensorsShardWriter

        original_write = SafetensorsShardWriter.write

        def write(writer, name, tensor):
            self.sample()
            return original_write(writer, name, tensor)

        monkeypatch.setattr(SafetensorsShardWriter, "write", write)
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(lambda *_: self.sample()),
                        torch.nn.modules.module.register_module_forward_hook(lambda *_: self.sample())]

    def bytes_alive(self) -> int:
        seen: dict[int, int] = {}
        for t in list(self.live):
            if t.device.type == "meta" or tuple(t.shape) == self.excluded_shape:
                continue
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def sample(self) -> None:
        self.peak = max(self.peak, self.bytes_alive())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_never_more_than_two_layers_of_parameters_alive(tmp_path, monkeypatch):
    """Four MLP-heavy layers (the hidden states are a few kB); two passes, refit with error correction."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    layer_bytes = sum(t.numel() * 4 for n, t in LlamaForCausalLM(config).state_dict().items() if ".layers.0." in n)
    calib, refit_ids = token_ids(batch=2, length=8, seed=1) % 96, token_ids(batch=3, length=8, seed=2) % 96
    prune_config = plain_config(ratio=0.3, layer_importance="activation", importance="activation", calib_samples=2,
                               refit="lstsq", refit_samples=3, refit_seq_len=8)
    counter = _LiveParameters(monkeypatch, excluded_shape=(96, 32))
    try:
        prune_checkpoint(tmp_path / "dense", prune_config, tmp_path / "out", calib_ids=calib, refit_ids=refit_ids,
                         progress=False)
        sequential_peak = counter.peak
        # the same counter on the in-memory path sees all four layers (twice: the model and its copy)
        counter.peak = 0
        model, _ = load_model(tmp_path / "dense", require_tokenizer=False)
        prune(model, None, prune_config, calib_ids=calib, refit_ids=refit_ids, progress=False)
        in_memory_peak = counter.peak
    finally:
        counter.remove()
    assert layer_bytes <= sequential_peak <= 2 * layer_bytes, (sequential_peak, layer_bytes)
    assert in_memory_peak >= 4 * layer_bytes


# ---------------------------------------------------------------------------------------------------------
# the CLI: errors, interruption, the switch past --max-memory, in-place pruning


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory, wikitext_dir) -> Path:
    folder = _write_dense(CASES[0], tmp_path_factory.mktemp("cli") / "dense", shard="30KB")
    make_tokenizer().save_pretrained(folder)
    return folder


def _cli(checkpoint: Path, out: Path, wikitext_dir: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(checkpoint), "--ratio", "0.2", "--out", str(out), "--data-dir", str(wikitext_dir),
            "--calib-samples", "3", "--calib-seq-len", "16", "--no-progress", "--threads", "1", *extra]


FORWARD_ONLY = ("--importance", "activation", "--layer-importance", "activation")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_sequential_writes_a_loadable_folder(tmp_path, cli_checkpoint, wikitext_dir, capsys):
    from layerprune.cli import main

    out = tmp_path / "pruned"
    assert main(_cli(cli_checkpoint, out, wikitext_dir, "--sequential", *FORWARD_ONLY)) == 0
    printed = capsys.readouterr().out
    assert "layer by layer" in printed and "saved to" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["sequential"]["passes"] == 2 and report["model"] == str(cli_checkpoint)
    assert {"calibration", "element_scores", "layer_importance", "allocation", "pruning", "read", "write"} <= set(report["timings"])
    model, tokenizer = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]["total"]
    assert tokenizer is not None and (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]


def test_cli_refuses_gradient_importance_in_one_line(tmp_path, cli_checkpoint, wikitext_dir, capsys, monkeypatch):
    from layerprune.cli import main
    from layerprune.models import checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module.SafetensorsCheckpoint, "read",
                        lambda *a, **k: pytest.fail("a weight was read before the refusal"))
    for importance in ("taylor", "taylor2"):
        assert main(_cli(cli_checkpoint, tmp_path / "out", wikitext_dir, "--sequential", "--importance", importance)) == 2
        line = _one_error_line(capsys)
        assert f"importance '{importance}' needs a backward pass" in line and "distributed Taylor path" in line
    assert not (tmp_path / "out").exists()


def test_cli_goes_layer_by_layer_past_max_memory(tmp_path, cli_checkpoint, wikitext_dir, capsys):
    from layerprune.cli import main

    out = tmp_path / "auto"
    assert main(_cli(cli_checkpoint, out, wikitext_dir, "--max-memory", "100kB", *FORWARD_ONLY)) == 0
    err = capsys.readouterr().err
    assert "exceed --max-memory (100.0 kB): pruning layer by layer (--sequential)" in err
    report = json.loads((out / "report.json").read_text())
    assert report["sequential"]["hidden_states"]["ram_budget_bytes"] == 0  # the budget left nothing: all spilled
    assert report["sequential"]["hidden_states"]["spilled_bytes"] > 0
    # the defaults go layer by layer too: structured OBS, sensitivity curves (the reconstruction curves need a
    # backward pass through the whole model)
    assert main(_cli(cli_checkpoint, tmp_path / "default", wikitext_dir, "--max-memory", "100kB")) == 0
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    assert report["method"] == "unbalanced-sensitivity-dp+lstsq+obs" and "sequential" in report
    capsys.readouterr()
    # a gradient score cannot: one line saying why it had to go layer by layer
    assert main(_cli(cli_checkpoint, tmp_path / "taylor", wikitext_dir, "--max-memory", "100kB",
                     "--importance", "taylor")) == 2
    line = _one_error_line(capsys)
    assert "exceed --max-memory" in line and "distributed Taylor path" in line
    # enough memory: the in-memory path, as before
    assert main(_cli(cli_checkpoint, tmp_path / "whole", wikitext_dir, "--max-memory", "10GB", *FORWARD_ONLY)) == 0
    assert "sequential" not in json.loads((tmp_path / "whole" / "report.json").read_text())


def test_cli_interrupted_run_leaves_no_output_folder(tmp_path, cli_checkpoint, wikitext_dir, capsys, monkeypatch):
    """Ctrl-C in the middle of writing the pruned layers: exit 130, no output folder, no temporary one; an
    existing folder being overwritten stays as it was."""
    from layerprune.cli import main
    from layerprune.export.streamed import SafetensorsShardWriter

    original = SafetensorsShardWriter.write
    calls = []

    def interrupt(writer, name, tensor):
        calls.append(name)
        if name.startswith("model.layers.1."):
            raise KeyboardInterrupt
        return original(writer, name, tensor)

    monkeypatch.setattr(SafetensorsShardWriter, "write", interrupt)
    out = tmp_path / "out"
    assert main(_cli(cli_checkpoint, out, wikitext_dir, "--sequential", *FORWARD_ONLY)) == 130
    assert any(c.startswith("model.layers.0.") for c in calls)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(_cli(cli_checkpoint, out, wikitext_dir, "--sequential", "--overwrite", *FORWARD_ONLY)) == 130
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]
    capsys.readouterr()


def test_cli_missing_shard_or_truncated_file_is_one_line(tmp_path, cli_checkpoint, wikitext_dir, capsys):
    import shutil

    from layerprune.cli import main

    for damage in ("missing", "truncated", "missing-tensor"):
        broken = tmp_path / damage
        shutil.copytree(cli_checkpoint, broken)
        shard = sorted(broken.glob("model-*.safetensors"))[1]
        if damage == "missing":
            shard.unlink()
        elif damage == "truncated":
            os.truncate(shard, shard.stat().st_size - 100)
        else:
            index = json.loads((broken / "model.safetensors.index.json").read_text())
            index["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
            (broken / "model.safetensors.index.json").write_text(json.dumps(index))
        for extra in (("--sequential",), ("--max-memory", "1kB")):
            assert main(_cli(broken, tmp_path / "out", wikitext_dir, *extra, *FORWARD_ONLY)) == 2, damage
            line = _one_error_line(capsys)
            want = {"missing": f"shard {shard.name} listed in", "truncated": f"{shard.name} is truncated",
                    "missing-tensor": "has no tensor model.layers.1.mlp.up_proj.weight"}[damage]
            assert want in line, line
            assert not (tmp_path / "out").exists()


def test_cli_in_memory_prunes_its_own_copy_in_place(tmp_path, cli_checkpoint, wikitext_dir, capsys, monkeypatch):
    import copy

    from layerprune.cli import main
    from layerprune.pruning import pipeline

    class NoModelCopies:
        @staticmethod
        def deepcopy(obj, *args):
            if isinstance(obj, torch.nn.Module):
                raise AssertionError("the CLI deep-copied the model")
            return copy.deepcopy(obj, *args)

    monkeypatch.setattr(pipeline, "copy", NoModelCopies)
    assert main(_cli(cli_checkpoint, tmp_path / "out", wikitext_dir, *FORWARD_ONLY)) == 0
    capsys.readouterr()


def test_prune_copies_unless_inplace():
    case = CASES[0]
    model = make_model(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = plain_config(ratio=0.2, layer_importance="activation", importance="activation", calib_samples=4)
    calib, _ = _batches()
    result = prune(model, None, config, calib_ids=calib, progress=False)
    assert result.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    in_place = prune(model, None, config, calib_ids=calib, progress=False, inplace=True)
    assert in_place.model is model
    assert in_place.report["params_after"] == result.report["params_after"]
    assert in_place.report["kv_cache_bytes_per_token"] == result.report["kv_cache_bytes_per_token"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------
# the folder loads in plain transformers


_STANDALONE = BLOCK_LAYERPRUNE + textwrap.dedent(
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM

    for folder, ids_path, out_path in json.load(open(sys.argv[2])):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.load(ids_path), use_cache=False).logits, out_path)
    """
)


def test_plain_transformers_loads_sequential_folders(tmp_path, dense_dirs):
    """Sharded sequential outputs of every family load with trust_remote_code where layerprune cannot be imported."""
    calib, _ = _batches()
    config = plain_config(**SETTINGS["activation"], calib_samples=4)
    jobs, expected = [], {}
    ids = token_ids(seed=11)
    torch.save(ids, tmp_path / "ids.pt")
    for case in CASES:
        out, _ = prune_checkpoint(dense_dirs[case.name], config, tmp_path / case.name, calib_ids=calib,
                                  progress=False, max_shard_bytes=60_000)
        jobs.append([str(out), str(tmp_path / "ids.pt"), str(tmp_path / f"{case.name}.pt")])
        expected[case.name] = logits(load_pruned(out)[0], ids)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    site_dirs = [d for d in (*os.environ.get("PYTHONPATH", "").split(os.pathsep), *site.getsitepackages())
                 if d and Path(d).is_dir()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    result = subprocess.run([sys.executable, "-I", "-S", "-c", _STANDALONE, os.pathsep.join(site_dirs),
                             str(tmp_path / "jobs.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in CASES:
        torch.testing.assert_close(torch.load(tmp_path / f"{case.name}.pt"), expected[case.name], atol=1e-6, rtol=0,
                                   msg=case.name)


# ---------------------------------------------------------------------------------------------------------
# reading and writing safetensors one tensor at a time


def test_shard_writer_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from layerprune.export import SafetensorsShardWriter

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(33, 7), "b.bias": torch.randn(5).to(torch.bfloat16),
               "c.half": torch.randn(4, 3).half(), "d.index": torch.arange(11), "e.big": torch.randn(40, 40)}
    writer = SafetensorsShardWriter(tmp_path, max_shard_bytes=4000, scratch=tmp_path / "scratch")
    writer.write("b.bias", tensors["b.bias"])  # staged: before the plan
    writer.plan({k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    for name in ("e.big", "d.index", "c.half", "a.weight"):
        writer.write(name, tensors[name])
    with pytest.raises(InternalError, match="written twice"):
        writer.write("e.big", tensors["e.big"])
    with pytest.raises(InternalError, match="the plan has"):
        writer.write("a.weight", tensors["a.weight"].T.contiguous())
    files = writer.close()
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "scratch" / "staged.bin").exists()
    got = {}
    for file in files:
        got.update(load_file(str(tmp_path / file)))
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    # a tensor left unwritten is a bug, not a short file
    lazy = SafetensorsShardWriter(tmp_path / "lazy")
    (tmp_path / "lazy").mkdir()
    lazy.plan({"t": (torch.float32, (2,))})
    with pytest.raises(InternalError, match="never written"):
        lazy.close()


def test_checkpoint_reader_reads_what_transformers_wrote(tmp_path):
    model = make_model(CASES[4])
    for shard in ("50GB", "20KB"):
        folder = tmp_path / shard
        model.to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
        with SafetensorsCheckpoint(folder) as checkpoint:
            state = model.state_dict()
            for name in checkpoint.names():
                assert torch.equal(checkpoint.read(name), state[name]), name
                assert checkpoint.read(name, torch.float32).dtype == torch.float32
            assert checkpoint.nbytes() == checkpoint.bytes_read // 2
    with pytest.raises(ModelError, match="has neither model.safetensors nor"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="is not a safetensors file"):
        SafetensorsCheckpoint(tmp_path / "bad")


def test_prune_checkpoint_refuses_what_it_cannot_run(tmp_path, dense_dirs):
    calib, _ = _batches()
    with pytest.raises(InvalidInputError, match="distributed Taylor path"):
        prune_checkpoint(dense_dirs["llama3-gqa"], plain_config(ratio=0.2, importance="taylor"), tmp_path / "o",
                         calib_ids=calib)
    with pytest.raises(InvalidInputError, match="reads a local folder"):
        prune_checkpoint("org/not-here", plain_config(ratio=0.2, importance="l1"), tmp_path / "o", calib_ids=calib)
    pruned, _ = prune_checkpoint(dense_dirs["llama3-gqa"], plain_config(ratio=0.2, importance="l1",
                                 layer_importance="activation"), tmp_path / "p", calib_ids=calib, progress=False)
    with pytest.raises(ModelError, match="already pruned by layerprune"):
        prune_checkpoint(pruned, plain_config(ratio=0.2, importance="l1"), tmp_path / "again", calib_ids=calib)
    assert not (tmp_path / "o").exists() and not (tmp_path / "again").exists()
