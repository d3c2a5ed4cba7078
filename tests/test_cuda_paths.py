"""The CUDA-only branches, run on the CPU.

No GPU has been lent to this project's tasks, so what only happens on a GPU is checked here with stand-ins: a
fake CUDA device (torch's FakeTensorMode: tensors that carry a device and shapes but no data, and that raise the
same device-mismatch error as real CUDA tensors mixed with CPU ones), a simulated one that computes
(`tests/simulated_cuda.py`: the forward-only pipeline and the layer-by-layer engine run on it end to end), the meta
device, and recorded calls in place of torch.cuda's. `benches/gpu_check.sh` runs the real thing on a GPU."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import simulated_cuda
from conftest import make_tiny_llama


@contextlib.contextmanager
def fake_cuda():
    """Tensors created inside may live on "cuda" without a GPU; mixing them with CPU tensors raises."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


class _OpLog(TorchDispatchMode):
    """Records every aten op with its dtype / device keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), {k: v for k, v in kwargs.items() if k in ("dtype", "device")}))
        return func(*args, **kwargs)


# ---- refit Grams and the reconstruction Fisher: on the model's device --------------------------------------


def test_fake_cuda_catches_a_cpu_gram_fed_cuda_activations():
    """The stand-in is faithful: a CPU float64 Gram updated with CUDA rows fails as on a GPU (what
    `layerprune prune --device cuda` hit with the default method before the Grams followed the model)."""
    from layerprune.refit.lstsq import InputGram

    with fake_cuda():
        stats = InputGram.empty(8, device="cpu")
        rows = torch.randn(5, 8, device="cuda")
        stats.update(rows)  # the product is moved to where the Gram is: no error
        assert stats.gram.device.type == "cpu" and stats.count == 5
        with pytest.raises(RuntimeError, match="same device"):
            torch.zeros(8, 8, dtype=torch.float64).add_(rows.T @ rows)


def test_empty_grams_follow_the_layer():
    from layerprune.refit.grams import empty_grams

    model = make_tiny_llama(layers=1)
    layer = model.model.layers[0]
    assert {g.gram.device.type for g in empty_grams(layer).values()} == {"cpu"}
    layer.to("meta")
    grams = empty_grams(layer)
    assert {g.gram.device.type for g in grams.values()} == {"meta"}
    assert {g.total.device.type for g in grams.values()} == {"meta"}
    assert {g.gram.device.type for g in empty_grams(layer, "cpu").values()} == {"cpu"}


def test_output_projection_grams_on_a_cuda_model():
    from layerprune.refit.grams import output_projection_grams

    model = make_tiny_llama()
    ids = torch.randint(0, 128, (3, 12))
    with fake_cuda():
        cuda_model = model.to("cuda")
        grams = output_projection_grams(cuda_model, ids.to("cuda"), progress=False)
    assert len(grams) == 3
    for layer_grams in grams:
        for stats in layer_grams.values():
            assert stats.gram.device.type == "cuda" and stats.total.device.type == "cuda"
            assert stats.count == 3 * 12


def test_reconstruction_grams_and_fisher_on_a_cuda_model(monkeypatch):
    """The forward-only windows of `grams_and_fisher` (the default method's curves) on a CUDA model: the Grams and
    the Fisher buffers are on the device. (The backward windows need a real CUDA context: left to the GPU check.)"""
    from layerprune.importance import reconstruction

    monkeypatch.setattr(reconstruction, "_fisher_windows", lambda fisher_samples, n_local: 0)
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (3, 12))
    with fake_cuda():
        cuda_model = model.to("cuda")
        grams, fisher, _ = reconstruction.grams_and_fisher(cuda_model, ids.to("cuda"), progress=False)
    assert {s.gram.device.type for layer_grams in grams for s in layer_grams.values()} == {"cuda"}
    assert {f.device.type for layer_fisher in fisher for f in layer_fisher.values()} == {"cuda"}
    assert all(s.count == 3 * 12 for layer_grams in grams for s in layer_grams.values())


def test_grams_on_the_cpu_are_unchanged():
    """On the CPU the Grams are what they were: Σ xᵀx in float64 of float32 micro-batch products."""
    from layerprune.refit.grams import output_projection_grams

    torch.manual_seed(0)
    model = make_tiny_llama()
    ids = torch.randint(0, 128, (3, 12))
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        grams = output_projection_grams(model, ids, micro_batch=2, progress=False)
    finally:
        handle.remove()
    expected = sum((x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1])).double() for x in seen)
    torch.testing.assert_close(grams[1]["down_proj"].gram, expected, rtol=1e-6, atol=1e-6)
    assert grams[1]["down_proj"].gram.dtype == torch.float64


# ---- checkpoint reads bound for a GPU: page-locked, moved first, converted there ----------------------------


def test_host_buffer_is_pinned_only_for_cuda():
    from layerprune.models.checkpoint import host_buffer

    plain = host_buffer((2, 3), torch.bfloat16, "cpu")
    assert plain.shape == (2, 3) and plain.dtype == torch.bfloat16 and not plain.is_pinned()
    # bound for CUDA: page-locked where a driver is there; without one a plain buffer still works
    bound = host_buffer((2, 3), torch.float32, "cuda")
    assert bound.device.type == "cpu" and bound.shape == (2, 3)
    assert bound.is_pinned() == torch.cuda.is_available()


def test_a_read_for_cuda_moves_the_stored_bytes_then_converts():
    """bf16 stored, float32 wanted on CUDA: the copy carries the 2-byte values and the device widens them."""
    from layerprune.models.checkpoint import SafetensorsCheckpoint

    stored = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    with fake_cuda(), _OpLog() as log:
        out = SafetensorsCheckpoint._finish(stored, torch.float32, "cuda")
    assert out.device.type == "cuda" and out.dtype == torch.float32
    copies = [kw for op, kw in log.ops if op.startswith("aten._to_copy")]
    assert copies[0].get("device") is not None and copies[0].get("dtype") == torch.bfloat16  # moved as stored
    assert copies[-1] == {"dtype": torch.float32}  # converted on the device
    # on the CPU: converted there, values exact
    cpu = SafetensorsCheckpoint._finish(stored, torch.float32, "cpu")
    assert cpu.dtype == torch.float32 and torch.equal(cpu, stored.float())
    assert SafetensorsCheckpoint._finish(stored, None, "cpu") is stored


def test_checkpoint_read_to_cpu_is_unchanged(tmp_path):
    from safetensors.torch import save_file

    from layerprune.models.checkpoint import SafetensorsCheckpoint

    tensors = {"a": torch.randn(5, 7).to(torch.bfloat16), "b": torch.randn(4, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with SafetensorsCheckpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.read("a"), tensors["a"])
        assert torch.equal(ckpt.read("a", torch.float32), tensors["a"].float())
        assert torch.equal(ckpt.read_rows("b", 1, 3, torch.bfloat16), tensors["b"][1:3].to(torch.bfloat16))
        assert torch.equal(ckpt.read_row_set("a", torch.tensor([0, 4])), tensors["a"][[0, 4]])


# ---- Triton launches on the tensors' GPU, timings wait for the model's GPU --------------------------------


def test_kernels_launch_on_the_tensors_device():
    from layerprune.kernels import launch_device

    guard = launch_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # entered only on a GPU
    assert isinstance(launch_device(torch.device("cuda", 0)), torch.cuda.device)
    assert isinstance(launch_device(torch.device("cpu")), contextlib.nullcontext)
    with launch_device(torch.device("cpu")):
        pass


def test_kernel_launchers_use_the_device_guard():
    """Both launchers enter the guard around the launch (the interpreter on CPU gets a null context)."""
    import inspect

    from layerprune.kernels import activation_stats, weight_scores

    for launcher in (weight_scores.weight_scores_triton, activation_stats.channel_sums_triton):
        assert "with launch_device(" in inspect.getsource(launcher), launcher.__name__


def test_throughput_synchronizes_the_models_device(monkeypatch):
    import importlib

    perplexity = importlib.import_module("layerprune.evaluation.perplexity")

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    perplexity._synchronizer(torch.device("cuda", 1))()
    assert calls == [torch.device("cuda", 1)]
    perplexity._synchronizer(torch.device("cpu"))()
    assert calls == [torch.device("cuda", 1)]


# ---- data-parallel gradients in 16 bits: summed in float32 -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gradients_are_summed_over_ranks_in_float32(monkeypatch, dtype):
    from layerprune import distributed
    from layerprune.scoring import hooks

    seen = []

    def fake_all_reduce(tensors, *, group=None):  # two ranks holding the same gradient
        for t in tensors:
            seen.append(t.dtype)
            t.mul_(2)

    monkeypatch.setattr(distributed, "all_reduce_sum_", fake_all_reduce)
    g = (torch.randn(6, 5) * 3).to(dtype)
    expected = g.float() * 2
    summed = hooks._sum_over_ranks(g)
    assert seen == [torch.float32]
    assert summed.dtype == torch.float32 and torch.equal(summed, expected)
    assert torch.equal(g, expected.to(dtype))  # .grad holds the sum, as an in-place all-reduce leaves it


def test_scorer_scores_the_float32_sum_of_bf16_gradients(monkeypatch):
    """GradientScorer under data parallelism (two simulated ranks): a bf16 model's gradients reach the scores as
    their float32 sum, so the scores are twice one rank's."""
    from layerprune import distributed
    from layerprune.scoring import GradientScorer
    from layerprune.scoring.reference import weight_scores_reference

    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False)).to(torch.bfloat16)
    dtypes = []

    def fake_all_reduce(tensors, *, group=None):
        for t in tensors:
            dtypes.append(t.dtype)
            t.mul_(2)

    monkeypatch.setattr(distributed, "active", lambda: object())
    monkeypatch.setattr(distributed, "all_reduce_sum_", fake_all_reduce)
    x = torch.randn(3, 6).to(torch.bfloat16)
    with GradientScorer(model, kinds=("taylor",), module_filter=lambda n, m: isinstance(m, torch.nn.Linear),
                        free_grads=False) as scorer:
        model(x).float().pow(2).sum().backward()
        grad = model[0].weight.grad.clone()
        scorer.step()
    rows = scorer.row_scores("0", "taylor")
    assert dtypes == [torch.float32]
    assert grad.dtype == torch.bfloat16
    # the hook saw the local gradient g; the scores are of 2g in float32 (.grad holds 2g rounded to bf16)
    local = grad.float() / 2
    torch.testing.assert_close(rows, weight_scores_reference(model[0].weight.detach(), local * 2, kind="taylor", axis=0))


# ---- the whole forward-only pipeline on a simulated CUDA device ---------------------------------------------

simulated = pytest.mark.skipif(not simulated_cuda.available(),
                               reason="a real GPU is visible (benches/gpu_check.sh runs the real thing), or this "
                                      "torch lacks the hooks of tests/simulated_cuda.py")
SIM_CONFIGS = {
    # the sensitivity curves after a refit, chosen by OBS: what --sequential and compare run by default
    "sensitivity-obs-lstsq": dict(layer_importance="sensitivity", importance="obs", refit="lstsq"),
    "activation-lstsq-bias": dict(layer_importance="activation", importance="activation", refit="lstsq-bias"),
    "removal-l1-bias": dict(layer_importance="removal", importance="l1", refit="bias"),
}


def _sim_config(**extra):
    from layerprune import PruneConfig

    return PruneConfig(ratio=0.25, calib_samples=4, calib_seq_len=16, refit_samples=8, refit_seq_len=24, **extra)


def _sim_batches():
    return (torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0)),
            torch.randint(0, 64, (8, 24), generator=torch.Generator().manual_seed(1)))


def _sim_model():
    return make_tiny_llama(num_heads=4, num_kv_heads=2, head_dim=8, hidden=32, intermediate=64, layers=3, vocab=64)


def _kept(report):
    return [(layer["kv_heads_kept"], layer["mlp_channels_kept"]) for layer in report["layers"]]


@simulated
def test_the_simulated_device_raises_where_cuda_does():
    with simulated_cuda.simulated_cuda():
        x = torch.ones(3, 4, device="cuda")
        assert isinstance(x, simulated_cuda.SimCuda) and x.device.type == "cuda"
        assert (x + torch.tensor(2.0)).device.type == "cuda"  # a CPU scalar is fine
        assert x[torch.tensor([0, 2])].shape == (2, 4)  # so are CPU indices
        with pytest.raises(simulated_cuda.DeviceMixError):
            x + torch.ones(3, 4)
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        back = x.to("cpu")
        assert not isinstance(back, simulated_cuda.SimCuda) and torch.equal(back, torch.ones(3, 4))
        model = torch.nn.Linear(4, 2).to("cuda")
        assert isinstance(model.weight, simulated_cuda.SimCuda) and isinstance(model.weight, torch.nn.Parameter)
        assert model(x).device.type == "cuda"


@simulated
@pytest.mark.parametrize("name", [*SIM_CONFIGS, "flap"])
def test_prune_on_cuda_keeps_what_the_cpu_keeps(name):
    """`layerprune.prune` with the model on (simulated) CUDA: no tensor of the pipeline lands on the CPU next to
    the model's, and the kept heads and channels are the CPU run's."""
    import layerprune

    config = _sim_config(mode="flap", importance="l2") if name == "flap" else _sim_config(**SIM_CONFIGS[name])
    calib, refit = _sim_batches()
    model = _sim_model()
    reference = layerprune.prune(model, None, config, calib_ids=calib, refit_ids=refit, progress=False)
    with simulated_cuda.simulated_cuda():
        on_cuda = model.to("cuda")
        result = layerprune.prune(on_cuda, None, config, calib_ids=calib, refit_ids=refit, progress=False)
        assert next(result.model.parameters()).device.type == "cuda"
    assert _kept(result.report) == _kept(reference.report)


@simulated
@pytest.mark.parametrize(("name", "tier"), [("sensitivity-obs-lstsq", "device"), ("sensitivity-obs-lstsq", "ram"),
                                            ("sensitivity-obs-lstsq", "disk"), ("activation-lstsq-bias", "device"),
                                            ("removal-l1-bias", "disk")])
def test_layer_by_layer_on_cuda_writes_what_the_cpu_writes(tmp_path, name, tier):
    """The layer-by-layer engine with device="cuda": layers, refit Grams and head on the device, the hidden states
    on the device, in RAM (no device memory free) or spilled to files (no RAM budget either); the same kept heads
    and channels as on the CPU, the same tensors to float rounding."""
    from safetensors.torch import load_file

    from layerprune.export import prune_checkpoint

    _sim_model().save_pretrained(tmp_path / "dense")
    config = _sim_config(**SIM_CONFIGS[name])
    calib, refit = _sim_batches()
    prune_checkpoint(tmp_path / "dense", config, tmp_path / "cpu", calib_ids=calib, refit_ids=refit, progress=False)
    with simulated_cuda.simulated_cuda():
        if tier != "device":
            torch.cuda.mem_get_info = lambda device=None: (0, 80 * 2**30)  # put back on leaving
        _, result = prune_checkpoint(tmp_path / "dense", config, tmp_path / "cuda", calib_ids=calib, refit_ids=refit,
                                     device="cuda", progress=False, hidden_budget_bytes=0 if tier == "disk" else 2**40)
    assert result.report["sequential"]["device"] == "cuda"
    hidden = result.report["sequential"]["hidden_states"]
    used = {"device": hidden["peak_device_bytes"], "ram": hidden["peak_ram_bytes"], "disk": hidden["spilled_bytes"]}
    assert used[tier] > 0 and sum(used.values()) == used[tier]
    cpu_report = json.loads((tmp_path / "cpu" / "report.json").read_text())
    assert _kept(result.report) == _kept(cpu_report)
    expected = load_file(str(tmp_path / "cpu" / "model.safetensors"))
    got = load_file(str(tmp_path / "cuda" / "model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-4 * float(expected[key].abs().max()))


@simulated
def test_perplexity_throughput_and_generation_on_cuda():
    from layerprune.evaluation.perplexity import generate_greedy, perplexity, throughput

    model = _sim_model()
    tokens = torch.randint(0, 64, (300,), generator=torch.Generator().manual_seed(2))
    reference = perplexity(model, tokens, seq_len=32, batch_size=3, progress=False)

    class Tokenizer:
        eos_token_id = None

        def __call__(self, text, return_tensors=None):
            return type("Encoded", (), {"input_ids": torch.tensor([[1, 2, 3]])})()

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    expected = generate_greedy(model, Tokenizer(), ["x"], max_new_tokens=3)
    with simulated_cuda.simulated_cuda():
        on_cuda = model.to("cuda")
        got = perplexity(on_cuda, tokens, seq_len=32, batch_size=3, progress=False)
        assert throughput(on_cuda, seq_len=16, repeats=1) > 0
        assert generate_greedy(on_cuda, Tokenizer(), ["x"], max_new_tokens=3) == expected
    assert got["tokens"] == reference["tokens"] and got["ppl"] == pytest.approx(reference["ppl"], rel=1e-5)


@simulated
def test_healing_forward_paths_on_cuda_give_the_cpu_values(tmp_path):
    """Healing with both models on (simulated) CUDA: the teacher cache fill (the teacher on the device, the rows
    written to the CPU's memory map), the held-out evaluation on the cached rows and on the live teacher give the
    CPU run's values. The backward and the optimizer step need a real device (this one runs no backward):
    `benches/gpu_check.sh` heals there."""
    from layerprune.healing import HealConfig
    from layerprune.healing.text import HealText
    from layerprune.healing.trainer import HealTrainer, _teacher_cache

    generator = torch.Generator().manual_seed(3)
    text = HealText(train=torch.randint(0, 64, (6, 24), generator=generator),
                    held_out=torch.randint(0, 64, (3, 24), generator=generator), source={"text": "random ids"})
    config = HealConfig(tokens=2 * 4 * 24, seq_len=24, batch_size=4, micro_batch_size=2, top_k=8)
    teacher = _sim_model()
    student = make_tiny_llama(num_heads=4, num_kv_heads=2, head_dim=8, hidden=32, intermediate=64, layers=3, vocab=64,
                              seed=1)  # another draw of the teacher's shape

    def held_out(folder, student, teacher):
        cache = _teacher_cache(teacher, text, config, folder, 64, False)[0]
        cached = HealTrainer(student, None, cache, text, config).evaluate()
        live = HealTrainer(student, teacher, None, text, HealConfig(**{**config.to_dict(), "teacher_logits": "live"}))
        rows = cache.rows(range(9))
        cache.close()
        return cached, live.evaluate(), rows

    reference = held_out(tmp_path / "cpu", student, teacher)
    with simulated_cuda.simulated_cuda():
        got = held_out(tmp_path / "cuda", copy.deepcopy(student).to("cuda"), copy.deepcopy(teacher).to("cuda"))
    for name in ("cached", "live"):
        index = ("cached", "live").index(name)
        for key in ("loss", "kl", "ppl"):
            assert got[index][key] == pytest.approx(reference[index][key], rel=1e-5), (name, key)
    assert reference[0]["kl"] > 0 and reference[1]["kl"] == pytest.approx(reference[0]["kl"], rel=1e-5)
    torch.testing.assert_close(got[2][0], reference[2][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2][1], reference[2][1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
@pytest.mark.parametrize("command", ["eval", "compare"])
def test_a_missing_cuda_device_is_one_error_line(command, capsys, tmp_path, wikitext_dir):
    """`--device cuda` on a machine without one: one line and exit 2, as bad input is, not torch's traceback and
    the exit of a bug (70); checked before any model is read."""
    from layerprune.cli import main

    extra = ["--data-dir", str(wikitext_dir)]
    extra += ["--out", str(tmp_path / "cmp"), "--ratio", "0.2"] if command == "compare" else []
    for device, message in (("cuda", "no CUDA device is visible"), ("cuda:3", "no CUDA device is visible"),
                            ("gpu", "is not a torch device")):
        code = main([command, "--model", str(tmp_path / "never-read"), "--device", device, "--no-progress", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (device, err)


def test_check_device_counts_the_visible_gpus(monkeypatch):
    from layerprune.cli.args import check_device
    from layerprune.errors import InvalidInputError

    check_device(None)
    check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda")
    check_device("cuda:1")
    with pytest.raises(InvalidInputError, match="only 2 CUDA device"):
        check_device("cuda:2")
