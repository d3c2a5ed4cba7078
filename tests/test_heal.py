"""Healing by distillation: the losses against direct computations, one step lowering the loss, LoRA merged
equal to unmerged, a killed run resumed onto the uninterrupted run's weights, every family's healed folder
reloaded both ways and exported to GGUF, the evaluated text refused, and the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from families import CASES, logits, make_model, make_tokenizer, token_ids
from gguf_models import empty_blocks_keep
from hypothesis import example, given, settings
from hypothesis import strategies as st

from layerprune.arch import check_consistency, layer_shapes
from layerprune.cli import main
from layerprune.errors import DataError, InvalidInputError, ModelError
from layerprune.export import save_pruned
from layerprune.healing import HealConfig, full_kl, heal, learning_rate, step_sequences, teacher_top_k, top_k_kl
from layerprune.healing.lora import add_lora, merge_lora
from layerprune.healing.trainer import HealTrainer
from layerprune.healing.text import heal_text
from layerprune.models import load_pruned
from layerprune.pruning import pruned_copy
from layerprune.scoring.selection import LayerKeep

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


# ---- the losses -------------------------------------------------------------------------------------------


def _direct_kl(student: np.ndarray, teacher: np.ndarray, k: int, temperature: float) -> float:
    """KL of the teacher's top-k tokens plus one 'any other token' outcome, summed over positions, in float64
    with explicit probabilities (no log-softmax, no gather)."""
    total = 0.0
    for s_row, t_row in zip(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])):
        p = np.exp(t_row / temperature - np.max(t_row / temperature))
        p /= p.sum()
        q = np.exp(s_row / temperature - np.max(s_row / temperature))
        q /= q.sum()
        top = np.argsort(-p, kind="stable")[:k]
        kl = float(np.sum(p[top] * (np.log(p[top]) - np.log(q[top]))))
        p_tail, q_tail = 1.0 - p[top].sum(), 1.0 - q[top].sum()
        if k < p.size and p_tail > 0:
            kl += p_tail * (math.log(p_tail) - math.log(q_tail))
        total += kl
    return total * temperature**2


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 40), temperature=st.sampled_from([0.5, 1.0, 2.0]))
@example(seed=6, k=22, temperature=0.5)  # the student's 22 tokens hold all but < 1e-7: 1 − Σq rounded to 0 (was inf)
def test_top_k_kl_equals_the_direct_computation(seed, k, temperature):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(2, 3, 23, generator=g) * 3, torch.randn(2, 3, 23, generator=g) * 3
    log_p, ids = teacher_top_k(teacher, k, temperature)
    got = float(top_k_kl(student, log_p, ids, temperature))
    want = _direct_kl(student.double().numpy(), teacher.double().numpy(), k, temperature)
    assert got == pytest.approx(want, rel=2e-4, abs=2e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_at_the_vocabulary_is_the_full_kl(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 50, generator=g) * 2, torch.randn(3, 5, 50, generator=g) * 2
    full = full_kl(student, teacher, temperature)
    for k in (50, 51, 10_000):
        log_p, ids = teacher_top_k(teacher, k, temperature)
        assert float(top_k_kl(student, log_p, ids, temperature)) == pytest.approx(float(full), rel=1e-5)
    p = torch.softmax(teacher.double() / temperature, -1)
    direct = (p * (p.log() - torch.log_softmax(student.double() / temperature, -1))).sum() * temperature**2
    assert float(full) == pytest.approx(float(direct), rel=1e-5)


def test_top_k_kl_is_zero_for_the_teacher_itself_and_its_gradient_flows():
    teacher = torch.randn(2, 4, 30)
    log_p, ids = teacher_top_k(teacher, 5)
    assert float(top_k_kl(teacher, log_p, ids)) == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(2, 4, 30, requires_grad=True)
    top_k_kl(student, log_p, ids).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


@pytest.mark.parametrize("k, temperature, ce_weight, bias, softcap", [
    (5, 1.0, 0.0, False, None), (30, 1.0, 0.0, True, None), (5, 1.0, 0.7, True, None), (30, 1.0, 1.0, False, None),
    (5, 2.0, 0.5, True, None), (40, 0.5, 1.0, False, None), (7, 0.5, 0.0, False, None),
    (5, 1.0, 0.5, True, 1.5), (30, 2.0, 1.0, False, 0.8)])
def test_the_fused_head_loss_and_its_gradients_equal_autograd(monkeypatch, k, temperature, ce_weight, bias, softcap):
    """The closed-form gradients of the chunked head + loss against autograd through the logits (float64)."""
    from layerprune.healing import fused_head

    monkeypatch.setattr(fused_head, "CHUNK_POSITIONS", 7)  # 20 positions: chunks of 7, 7 and 6
    g = torch.Generator().manual_seed(k)
    n, d, vocab = 20, 6, 30
    hidden = torch.randn(n, d, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(vocab, d, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(vocab, dtype=torch.float64, generator=g).requires_grad_() if bias else None
    log_p, ids = teacher_top_k(torch.randn(n, vocab, dtype=torch.float64, generator=g), k, temperature)
    labels = torch.randint(0, vocab, (n,), generator=g)
    inputs = [hidden, weight] + ([b] if b is not None else [])
    z = hidden @ weight.T + (b if b is not None else 0.0)
    z = z if softcap is None else (z / softcap).tanh() * softcap
    want = top_k_kl(z, log_p, ids, temperature).double() + ce_weight * torch.nn.functional.cross_entropy(
        z, labels, reduction="sum")
    want_grads = torch.autograd.grad(want, inputs)
    got = fused_head.fused_head_distillation(hidden, weight, b, log_p, ids, labels, temperature, ce_weight,
                                             torch.float64, softcap)
    got_grads = torch.autograd.grad(got[0], inputs)
    assert float(got[0].detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for a, c in zip(want_grads, got_grads):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = HealConfig(tokens=100 * 8 * 256, warmup=0.1, lr=1e-3, min_lr_ratio=0.1)
    rates = [learning_rate(s, config) for s in range(config.steps)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(rates[:10], rates[1:10]))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(1e-4)


def test_each_epoch_reads_every_sequence_once_in_a_seeded_order():
    config = HealConfig(batch_size=3, seed=5)
    first = [i for s in range(4) for i in step_sequences(s, config, 12)]
    second = [i for s in range(4, 8) for i in step_sequences(s, config, 12)]
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12)) and first != second
    assert first == [i for s in range(4) for i in step_sequences(s, config, 12)]


# ---- training ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, wikitext_dir) -> str:
    """The first 40 kB of WikiText-2 valid as a text file (healing text, never the test split)."""
    path = tmp_path_factory.mktemp("text") / "heal.txt"
    path.write_text((wikitext_dir / "valid.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return str(path)


def _keep(model) -> list[LayerKeep]:
    return [LayerKeep(kv_heads=tuple(range(0, s["num_kv_heads"], 2)) or (0,),
                      mlp_channels=tuple(range(0, s["intermediate"], 3 + i)))
            for i, s in enumerate(layer_shapes(model))]


@pytest.mark.parametrize("keep", [_keep, empty_blocks_keep], ids=["pruned", "empty-blocks"])
def test_one_step_lowers_the_loss(small_text, keep):
    """One full step lowers the distillation loss and keeps every layer's widths (empty blocks stay empty)."""
    teacher, tokenizer = make_model(CASES[0]), make_tokenizer()
    student = pruned_copy(teacher, keep(teacher)).train()
    widths = layer_shapes(student)
    config = HealConfig(tokens=4 * 32, seq_len=32, batch_size=4, lr=1e-3, warmup=0.0, dataset=small_text)
    text = heal_text(tokenizer, config.seq_len, config.held_out_fraction, config.dataset)
    trainer = HealTrainer(student, teacher.eval(), None, text, config)  # the live teacher
    rows = step_sequences(0, config, int(text.train.shape[0]))
    with torch.no_grad():
        before = float(trainer.loss_sums(text.train[rows], rows)[0])
    trainer.train_step(0)
    with torch.no_grad():
        after = float(trainer.loss_sums(text.train[rows], rows)[0])
    assert after < before * 0.99, (before, after)
    assert layer_shapes(student) == widths
    check_consistency(student)


def test_fsdp_without_a_process_group_is_refused_in_one_line(small_text):
    """Sharding needs ranks (under torchrun; tests/test_distributed.py runs it on 2): one line, nothing trained."""
    teacher = make_model(CASES[0])
    student = pruned_copy(teacher, _keep(teacher))
    config = HealConfig(tokens=4 * 32, seq_len=32, batch_size=4, fsdp=True, dataset=small_text)
    with pytest.raises(InvalidInputError, match="--fsdp needs a torch.distributed process group"):
        heal(student, teacher, make_tokenizer(), config, progress=False)


@pytest.mark.parametrize("setting", [{"gradient_checkpointing": True}, {"micro_batch_size": 1},
                                     {"teacher_logits": "live"}], ids=["checkpointing", "accumulation", "live"])
def test_memory_and_teacher_settings_change_nothing_but_the_cost(small_text, setting):
    """Gradient checkpointing, gradient accumulation and the live teacher train to the same weights as the
    plain cached run (to float rounding: accumulation adds the micro-batches' gradients in another order)."""
    teacher, tokenizer = make_model(CASES[1]), make_tokenizer()
    base = HealConfig(tokens=2 * 4 * 32, seq_len=32, batch_size=4, lr=1e-3, eval_every=1, dataset=small_text)
    student = pruned_copy(teacher, _keep(teacher))
    want = heal(student, teacher, tokenizer, base, progress=False).model.state_dict()
    got = heal(student, teacher, tokenizer, dataclasses.replace(base, **setting), progress=False).model.state_dict()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_early_stopping_keeps_the_best_held_out_weights(tmp_path, small_text):
    """A learning rate far too high makes the held-out loss rise after the first step: with patience 1 the run
    stops at the next evaluation and returns the weights of the best one."""
    teacher, tokenizer = make_model(CASES[0]), make_tokenizer()
    config = HealConfig(tokens=6 * 4 * 32, seq_len=32, batch_size=4, lr=0.3, warmup=0.0, max_grad_norm=None,
                        eval_every=1, patience=1, dataset=small_text)
    result = heal(pruned_copy(teacher, _keep(teacher)), teacher, tokenizer, config, tmp_path / "out", progress=False)
    h = result.report["heal"]
    losses = [row[2] for row in h["history"]["held_out"]]
    assert h["stopped_early"] and h["steps"] < 6 and losses[-1] >= min(losses[1:])
    best = min(range(1, len(losses)), key=lambda i: losses[i])
    assert h["best_step"] == h["history"]["held_out"][best][0]
    assert h["held_out_after"]["loss"] == pytest.approx(losses[best], rel=1e-6)
    assert not (tmp_path / "out.heal-state").exists()


def test_bfloat16_autocast_trains_float32_weights(small_text):
    teacher, tokenizer = make_model(CASES[0]), make_tokenizer()
    config = HealConfig(tokens=3 * 4 * 32, seq_len=32, batch_size=4, lr=1e-3, eval_every=3, precision="bfloat16",
                        dataset=small_text)
    result = heal(pruned_copy(teacher, _keep(teacher)), teacher, tokenizer, config, progress=False)
    h = result.report["heal"]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert h["held_out_after"]["loss"] < h["held_out_before"]["loss"]


def test_lora_merged_gives_the_unmerged_models_logits():
    pytest.importorskip("peft")  # installed by `make test` (the heal extra); the CLI refuses --lora without it
    teacher = make_model(CASES[4])  # Qwen2: q/k/v biases too
    student = pruned_copy(teacher, _keep(teacher))
    wrapped = add_lora(student, rank=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # peft starts B at zero: make the adapters count
    ids = token_ids(seed=3)
    unmerged = logits(wrapped.eval(), ids)
    assert not torch.allclose(unmerged, logits(pruned_copy(teacher, _keep(teacher)), ids), atol=1e-3)
    merged = merge_lora(wrapped)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=2e-5, rtol=0)
    assert [tuple(s.values()) for s in layer_shapes(merged)] == [tuple(s.values()) for s in layer_shapes(student)]


def test_the_evaluated_text_is_refused(wikitext_dir):
    with pytest.raises(DataError, match="is the evaluated text"):
        heal_text(make_tokenizer(), 32, 0.05, str(wikitext_dir / "test.txt"), str(wikitext_dir))


def test_a_checkpoint_is_not_overwritten_without_resume_and_resume_needs_one(tmp_path, small_text):
    teacher, tokenizer = make_model(CASES[0]), make_tokenizer()
    student = pruned_copy(teacher, _keep(teacher))
    config = HealConfig(tokens=2 * 4 * 32, seq_len=32, batch_size=4, dataset=small_text)
    with pytest.raises(InvalidInputError, match="no checkpoint"):
        heal(student, teacher, tokenizer, config, tmp_path / "out", resume=True, progress=False)
    (tmp_path / "out.heal-state" / "checkpoint").mkdir(parents=True)
    (tmp_path / "out.heal-state" / "checkpoint" / "progress.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="pass --resume"):
        heal(student, teacher, tokenizer, config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- the command line: kills and resumes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dense Llama folder and a pruned folder of it (with a report.json)."""
    root = tmp_path_factory.mktemp("models")
    dense = make_model(CASES[0])
    dense.save_pretrained(root / "dense")
    make_tokenizer().save_pretrained(root / "dense")
    save_pruned(pruned_copy(dense, _keep(dense)), make_tokenizer(), root / "pruned", report={"method": "test"})
    return root / "dense", root / "pruned"


def _heal_argv(folders, out: Path, small_text: str, *extra: str) -> list[str]:
    dense, pruned = folders
    return ["heal", "--model", str(pruned), "--teacher", str(dense), "--out", str(out), "--data", small_text,
            "--tokens", str(6 * 4 * 32), "--seq-len", "32", "--batch-size", "4", "--micro-batch-size", "2",
            "--lr", "1e-3", "--eval-every", "2", "--checkpoint-every", "1", "--no-progress", "--threads", "1", *extra]


def _cli(argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LAYERPRUNE_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-m", "layerprune", *argv], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_killed_run_resumes_onto_the_uninterrupted_weights(tmp_path, folders, small_text, lora):
    extra = ("--lora", "--lora-rank", "4") if lora else ()
    whole = _cli(_heal_argv(folders, tmp_path / "whole", small_text, *extra))
    assert whole.returncode == 0, whole.stderr[-3000:]
    step = random.randrange(1, 6)  # 6 steps: killed after any of the first five
    point = random.choice(["heal-step", "heal-checkpoint-write"])
    killed = _cli(_heal_argv(folders, tmp_path / "cut", small_text, *extra), fault=f"{point}:{step}")
    assert killed.returncode == -signal.SIGKILL, (point, step, killed.stderr[-2000:])
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.heal-state" / "teacher").is_dir()
    checkpointed = (tmp_path / "cut.heal-state" / "checkpoint" / "progress.json").is_file()
    assert checkpointed == (point == "heal-step" or step > 1), (point, step)  # killed in the first write: none
    if checkpointed:
        again = _cli(_heal_argv(folders, tmp_path / "cut", small_text, *extra))
        assert again.returncode == 2 and "pass --resume" in again.stderr, again.stderr
        resumed = _cli(_heal_argv(folders, tmp_path / "cut", small_text, *extra, "--resume"))
    else:  # nothing to resume: the same command starts over (the half-written checkpoint is cleared)
        resumed = _cli(_heal_argv(folders, tmp_path / "cut", small_text, *extra))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), (point, step, name)
    assert not (tmp_path / "cut.heal-state").exists()
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["method"] == "test" and report["heal"]["steps"] == 6 and report["heal"]["tokens"] == 6 * 4 * 32
    whole_report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["heal"]["history"]["held_out"] == whole_report["heal"]["history"]["held_out"]
    assert (tmp_path / "cut" / "heal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_heal_lowers_the_held_out_loss_and_shares_its_teacher_cache(tmp_path, folders, small_text, capsys):
    cache = tmp_path / "cache"
    argv = _heal_argv(folders, tmp_path / "a", small_text, "--teacher-cache", str(cache))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out: loss" in printed
    report = json.loads((tmp_path / "a" / "report.json").read_text())["heal"]
    assert report["held_out_after"]["loss"] < report["held_out_before"]["loss"]
    assert report["teacher_cache_seconds"] > 0 and (cache / "meta.json").is_file()
    stamp = (cache / "log_probs.npy").stat().st_mtime_ns
    assert main(_heal_argv(folders, tmp_path / "b", small_text, "--teacher-cache", str(cache))) == 0
    assert (cache / "log_probs.npy").stat().st_mtime_ns == stamp  # read, not rewritten
    assert torch.equal(_weights(tmp_path / "a")["model.layers.0.mlp.down_proj.weight"],
                       _weights(tmp_path / "b")["model.layers.0.mlp.down_proj.weight"])
    # another top-k is another cache: refused in one line, never overwritten
    assert main(_heal_argv(folders, tmp_path / "c", small_text, "--teacher-cache", str(cache), "--top-k", "3")) == 2
    assert "was made for another top_k" in capsys.readouterr().err


@pytest.mark.parametrize("argv_extra, message", [
    (("--tokens", "0"), "--tokens must be a positive integer"),
    (("--batch-size", "4", "--micro-batch-size", "3"), "not a multiple of --micro-batch-size"),
    (("--temperature", "-1"), "--temperature must be positive"),
    (("--resume",), "--resume: no checkpoint"),
])
def test_cli_refuses_bad_input_in_one_line(tmp_path, folders, small_text, capsys, argv_extra, message):
    assert main(_heal_argv(folders, tmp_path / "out", small_text, *argv_extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_out_inside_an_input_and_the_test_split(tmp_path, folders, small_text, wikitext_dir, capsys):
    dense, pruned = folders
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in pruned.iterdir())
    assert main(_heal_argv(folders, pruned / "healed", small_text)) == 2
    assert "inside the input model's folder" in capsys.readouterr().err
    argv = _heal_argv(folders, tmp_path / "out", small_text)
    argv[argv.index("--data") + 1] = str(wikitext_dir / "test.txt")
    assert main([*argv, "--data-dir", str(wikitext_dir)]) == 2
    assert "is the evaluated text" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in pruned.iterdir()) == before


# ---- every family: healed, reloaded both ways, exported ---------------------------------------------------


@pytest.mark.slow
def test_healed_folders_of_every_family_reload_both_ways_and_export(tmp_path, small_text):
    from test_families import _STANDALONE
    from families import SAMPLE_TEXT

    from layerprune.export import export_gguf

    import site

    jobs, expected = [], {}
    for case in CASES:
        teacher = make_model(case)
        student = pruned_copy(teacher, _keep(teacher))
        config = HealConfig(tokens=2 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3, dataset=small_text,
                            lora=case.name == "qwen2-bias")
        result = heal(student, teacher, make_tokenizer(), config, tmp_path / case.name, progress=False)
        ids = token_ids(seed=11)
        want = logits(result.model, ids)
        assert not torch.allclose(want, logits(student, ids), atol=1e-4), case.name  # training changed it
        loaded, _ = load_pruned(tmp_path / case.name)
        torch.testing.assert_close(logits(loaded, ids), want, atol=1e-6, rtol=0, msg=case.name)
        torch.save(ids, tmp_path / f"{case.name}.ids.pt")
        jobs.append([str(tmp_path / case.name), str(tmp_path / f"{case.name}.ids.pt"),
                     str(tmp_path / f"{case.name}.out.pt")])
        expected[case.name] = want
        if case.name in ("qwen3-qknorm", "gemma2-caps", "gemma3-localglobal", "phi3-fused", "olmo2-postnorm"):
            # deci has no q/k norms or post-norms; no LongRoPE in llama.cpp's llama / deci
            with pytest.raises(ModelError, match="no per-head q/k norms|no (gemma2|olmo2)'s norms|longrope RoPE"):
                export_gguf(tmp_path / case.name, tmp_path / f"{case.name}.gguf")
        else:
            gguf = export_gguf(tmp_path / case.name, tmp_path / f"{case.name}.gguf")
            assert gguf.path.stat().st_size == gguf.bytes > 0 and gguf.tensors > 0
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    site_dirs = [d for d in (*os.environ.get("PYTHONPATH", "").split(os.pathsep), *site.getsitepackages())
                 if d and Path(d).is_dir()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update({"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    result = subprocess.run([sys.executable, "-I", "-S", "-c", _STANDALONE, os.pathsep.join(site_dirs),
                             str(tmp_path / "jobs.json"), SAMPLE_TEXT], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    for case in CASES:
        out = torch.load(tmp_path / f"{case.name}.out.pt")
        assert out["modules"] == [], case.name
        torch.testing.assert_close(out["logits"], expected[case.name], atol=1e-6, rtol=0, msg=case.name)


def test_fused_head_is_finite_where_the_top_k_hold_all_the_mass():
    """The tail mass from the tokens outside the top K, not 1 − Σ_K: a finite loss and gradient in float32 where
    the latter rounds to 0 (the case above: seed 6, K = 22, T = 0.5), now through the fused head."""
    from layerprune.healing import fused_head

    g = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(2, 3, 23, generator=g) * 3, torch.randn(2, 3, 23, generator=g) * 3
    log_p, ids = teacher_top_k(teacher, 22, 0.5)
    want = _direct_kl(student.double().numpy(), teacher.double().numpy(), 22, 0.5)
    hidden = student.reshape(6, 23).clone().requires_grad_()  # with an identity head, the logits are the student's
    got = fused_head.fused_head_distillation(hidden, torch.eye(23), None, log_p.reshape(6, 22), ids.reshape(6, 22),
                                             torch.zeros(6, dtype=torch.long), 0.5, 0.0, torch.float32)
    (grad,) = torch.autograd.grad(got[0], [hidden])
    assert float(got[0].detach()) == pytest.approx(want, rel=2e-4, abs=2e-5)
    assert bool(torch.isfinite(grad).all())
