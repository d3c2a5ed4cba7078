"""The healing loop: AdamW with warm-up and cosine decay on the distillation loss, gradient accumulation,
held-out evaluation with early stopping, and resumable checkpoints written atomically.

A run is a pure function of its inputs, its config and its seed: the order of the training sequences is drawn
per epoch from ``seed + epoch``, the learning rate is a function of the step, and a checkpoint holds everything
else (the trainable weights, AdamW's state, the RNG state and the history), so a run resumed from any
checkpoint ends on the weights of the run that was never stopped. Under torchrun every rank takes its share of
each step's sequences and the gradients are summed over the ranks before the step (data parallel); with
``fsdp`` the decoder layers are sharded over the ranks (:mod:`layerprune.healing.sharding`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from layerprune import distributed
from layerprune.arch import adapter_for
from layerprune.atomic import (
    atomic_output_file,
    remove_stale_siblings,
    replace_dir,
    restore_interrupted,
    temp_sibling_dir,
    write_json_atomic,
)
from layerprune.errors import InvalidInputError, NumericalError
from layerprune.faults import fault_point
from layerprune.export.save import prepare_out_dir, save_pruned
from layerprune.healing.config import HealConfig, validate_heal_config
from layerprune.healing.lora import add_lora, merge_lora
from layerprune.healing.fused_head import fused_head_distillation
from layerprune.healing.losses import teacher_top_k
from layerprune.healing.sharding import (
    check_shardable,
    clip_grad_norm_,
    copy_back,
    full_optimizer_state,
    gather_trainable,
    is_sharded,
    padded_share,
    release_decoder_layers,
    shard_decoder_layers,
    shard_like,
    sharded_optimizer_state,
)
from layerprune.healing.teacher_cache import (
    TeacherCache,
    expected_meta,
    model_fingerprint,
    open_teacher_cache,
    tokens_fingerprint,
)
from layerprune.healing.text import HealText, heal_text

STATE_SUFFIX = ".heal-state"
CHECKPOINT_DIR = "checkpoint"
TEACHER_DIR = "teacher"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
PROGRESS_FILE = "progress.json"
BEST_FILE = "best.safetensors"
PLOT_FILE = "heal.png"


@dataclass
class HealResult:
    """The healed model (adapters merged, eval mode), and the ``heal`` section of its report."""

    model: torch.nn.Module
    report: dict[str, Any]
    out: Path | None = None


def learning_rate(step: int, config: HealConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up to the peak over the first
    ⌈warmup · steps⌉ steps, then a cosine from the peak to ``min_lr_ratio`` × the peak at the last step."""
    total, peak = config.steps, config.peak_lr
    warm = math.ceil(config.warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    floor = peak * config.min_lr_ratio
    progress = (step - warm) / max(1, total - warm - 1)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def step_sequences(step: int, config: HealConfig, n_train: int) -> list[int]:
    """Indices of the training sequences of optimizer step ``step``: the run reads the sequences in a new
    seeded order each epoch, ``batch_size`` per step."""
    out = []
    for g in range(step * config.batch_size, (step + 1) * config.batch_size):
        epoch, position = divmod(g, n_train)
        out.append(_epoch_order(n_train, config.seed, epoch)[position])
    return out


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear, float, float | None]:
    """The decoder (embeddings to the final norm), the head of ``model`` (the base model under peft), and the
    family's logits divisor ``d`` and soft cap ``c``: ``logits = c · tanh(head(hidden / d) / c)`` (no cap: None)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter = adapter_for(base, "model")
    return (adapter.inner_model(base), adapter.lm_head(base), adapter.logits_divisor(base.config),
            adapter.logit_softcap(base.config))


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class HealTrainer:
    """One healing run's student, teacher (or cache), text and AdamW: :meth:`train_step` and :meth:`evaluate`."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, cache: TeacherCache | None,
                 text: HealText, config: HealConfig):
        self.student, self.teacher, self.cache, self.text, self.config = student, teacher, cache, text, config
        self.device = _device_of(student)
        self.named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        decay = [p for n, p in self.named if p.dim() >= 2]
        flat = [p for n, p in self.named if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": flat, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.peak_lr,
                                           betas=(0.9, 0.95), eps=1e-8)
        self.n_train = int(text.train.shape[0])
        self.body_and_head = body_and_head(student)
        self.sharded = any(is_sharded(p) for _, p in self.named)

    def _autocast(self) -> Any:
        if self.config.precision == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss_sums(self, ids: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, float, float]:
        """(Σ loss to back-propagate, Σ KL, Σ cross-entropy) over the predicted positions of ``ids``: the decoder
        runs once, and the head and the loss run fused over chunks of positions (:mod:`.fused_head`)."""
        config = self.config
        ids = ids.to(self.device)
        if self.cache is not None:
            log_p, top_ids = (t.to(self.device) for t in self.cache.rows(rows))
        else:
            assert self.teacher is not None
            with torch.inference_mode(), self._autocast():
                teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1]
                log_p, top_ids = teacher_top_k(teacher_logits, config.top_k, config.temperature)
            log_p, top_ids = log_p.clone(), top_ids.clone()
        body, head, divisor, softcap = self.body_and_head
        with self._autocast():
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        if divisor != 1.0:
            hidden = hidden / divisor
        d = hidden.shape[-1]
        sums = fused_head_distillation(
            hidden.reshape(-1, d), head.weight, head.bias, log_p.reshape(-1, log_p.shape[-1]),
            top_ids.reshape(-1, top_ids.shape[-1]), ids[:, 1:].reshape(-1), config.temperature, config.ce_weight,
            torch.bfloat16 if config.precision == "bfloat16" else torch.float32, softcap)
        detached = sums.detach()
        return sums[0], float(detached[1]), float(detached[2])

    def _micro_batches(self, rows: list[int]) -> Iterator[list[int]]:
        size = self.config.micro_batch
        for start in range(0, len(rows), size):
            yield rows[start : start + size]

    def train_step(self, step: int) -> float:
        """One optimizer step; returns the mean loss per position of its whole batch (every rank's)."""
        config = self.config
        lr = learning_rate(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = step_sequences(step, config, self.n_train)
        positions = len(rows) * (config.seq_len - 1)
        local = rows[distributed.rank() :: distributed.world_size()]
        self.optimizer.zero_grad(set_to_none=False)
        total = 0.0
        for chunk in self._micro_batches(local):
            loss, _, _ = self.loss_sums(self.text.train[chunk], chunk)
            (loss / positions).backward()
            total += float(loss.detach())
        # sharded layers' gradients were summed by FSDP's reduce-scatter in the backward
        distributed.all_reduce_sum_([p.grad for _, p in self.named if p.grad is not None and not is_sharded(p.grad)])
        (total,) = distributed.sum_values(total)
        if not math.isfinite(total):
            raise NumericalError(f"healing step {step}: the loss is {total} (lower --lr)")
        if config.max_grad_norm is not None and self.sharded:
            clip_grad_norm_([p for _, p in self.named], config.max_grad_norm)
        elif config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], config.max_grad_norm)
        self.optimizer.step()
        return total / positions

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out distillation loss, KL and perplexity (exp of the mean cross-entropy), every rank's share summed."""
        self.student.eval()
        rows = list(range(int(self.text.held_out.shape[0])))
        kl = ce = 0.0
        if self.sharded:  # every rank runs as many forwards (FSDP gathers each layer in each): empty ones count 0
            chunks = padded_share(rows, self.config.micro_batch)
        else:
            chunks = list(self._micro_batches(rows[distributed.rank() :: distributed.world_size()]))
        for chunk in chunks:
            run = chunk or rows[:1]
            _, k, c = self.loss_sums(self.text.held_out[run], [self.n_train + r for r in run])
            if chunk:
                kl, ce = kl + k, ce + c
        kl, ce = distributed.sum_values(kl, ce)
        self.student.train()
        positions = len(rows) * (self.config.seq_len - 1)
        loss = (kl + self.config.ce_weight * ce) / positions
        return {"loss": loss, "kl": kl / positions, "ppl": math.exp(min(ce / positions, 700.0))}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors whole, on the CPU (every rank must call: sharded ones are gathered)."""
        return gather_trainable(self.named)

    def optimizer_state(self) -> dict[str, Any]:
        """AdamW's state with whole moments (every rank must call)."""
        return full_optimizer_state(self.optimizer) if self.sharded else self.optimizer.state_dict()

    def load_optimizer_state(self, saved: dict[str, Any]) -> None:
        if self.sharded:
            saved = sharded_optimizer_state(saved, [p for group in self.optimizer.param_groups for p in group["params"]])
        self.optimizer.load_state_dict(saved)

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(n for n, _ in self.named) - set(tensors))
        if missing:
            raise InvalidInputError(f"--resume: the checkpoint lacks {len(missing)} trainable tensors "
                                    f"({missing[0]}, ...): it was made by another run")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(shard_like(tensors[n].to(p.device), p))


def _write_checkpoint(state: Path, trainer: HealTrainer, progress: dict[str, Any]) -> None:
    """Every rank calls (sharded state is gathered); rank 0 writes."""
    from safetensors.torch import save_file

    if not (trainer.sharded or distributed.is_rank0()):
        return
    tensors, optimizer = trainer.trainable_state(), trainer.optimizer_state()
    if not distributed.is_rank0():
        return
    target = state / CHECKPOINT_DIR
    remove_stale_siblings(target)  # a killed run's half-written checkpoint
    tmp = temp_sibling_dir(target)
    try:
        save_file(tensors, str(tmp / TRAINABLE_FILE))
        fault_point("heal-checkpoint-write")
        torch.save({"optimizer": optimizer, "rng": torch.get_rng_state()}, tmp / OPTIMIZER_FILE)
        write_json_atomic(tmp / PROGRESS_FILE, progress)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_checkpoint(state: Path, trainer: HealTrainer, identity: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    folder = state / CHECKPOINT_DIR
    try:
        progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"--resume: no readable checkpoint in {folder} ({err})") from None
    differs = sorted(k for k in identity if progress.get("identity", {}).get(k) != identity[k])
    if differs:
        raise InvalidInputError(f"--resume: the checkpoint in {folder} was made with another {', '.join(differs)}; "
                                "resume with the same command, or remove the folder to start again")
    trainer.load_trainable(load_file(str(folder / TRAINABLE_FILE)))
    saved = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
    trainer.load_optimizer_state(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    return progress


def _save_best(state: Path, trainer: HealTrainer) -> None:
    """Every rank calls (sharded weights are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    if not (trainer.sharded or distributed.is_rank0()):
        return
    tensors = trainer.trainable_state()
    if not distributed.is_rank0():
        return
    with atomic_output_file(state / BEST_FILE) as tmp:
        save_file(tensors, str(tmp))


def sequences_read(config: HealConfig, n_train: int) -> list[int]:
    """Every training sequence the run's steps read (the first epoch's prefix, or all of them)."""
    total = config.steps * config.batch_size
    return list(range(n_train)) if total >= n_train else sorted(_epoch_order(n_train, config.seed, 0)[:total])


TeacherSource = Union[torch.nn.Module, Callable[[], torch.nn.Module], None]


def _materialize(teacher: TeacherSource) -> torch.nn.Module | None:
    """The teacher model: ``teacher`` itself, or what the loader ``teacher()`` returns."""
    if teacher is None or isinstance(teacher, torch.nn.Module):
        return teacher
    return teacher()


def _teacher_cache(teacher: TeacherSource, text: HealText, config: HealConfig, folder: Path, vocab: int,
                   progress: bool) -> tuple[TeacherCache, str | None, float, int]:
    """Open (or create) the cache at ``folder`` and compute the rows this run reads that it lacks; rank 0
    computes, the others wait and read. The teacher is loaded only here, and dropped on return."""
    sequences = torch.cat([text.train, text.held_out])
    model = _materialize(teacher)
    fingerprint = model_fingerprint(model) if model is not None else None
    meta = expected_meta(fingerprint, sequences, min(config.top_k, vocab), config.temperature)  # type: ignore[arg-type]
    n_train = int(text.train.shape[0])
    needed = sequences_read(config, n_train) + list(range(n_train, int(sequences.shape[0])))
    t0 = time.perf_counter()
    computed = 0
    if distributed.is_rank0():
        cache = open_teacher_cache(folder, meta, create=model is not None)
        computed = cache.fill(model, sequences, needed, batch_size=config.micro_batch, progress=progress)
    distributed.barrier("teacher-cache")
    if not distributed.is_rank0():
        cache = open_teacher_cache(folder, meta, create=False)
    del model
    return cache, cache.meta.get("teacher"), time.perf_counter() - t0, computed


def _check_vocabulary(model: torch.nn.Module, text: HealText, what: str) -> None:
    vocab = int(model.get_output_embeddings().weight.shape[0])
    top = int(max(text.train.max(), text.held_out.max()))
    if top >= vocab:
        raise InvalidInputError(f"{what}: the tokenizer gives token id {top}, beyond its vocabulary of {vocab}")


def heal(
    model: torch.nn.Module,
    teacher: TeacherSource,
    tokenizer: Any,
    config: HealConfig = HealConfig(),
    out: str | os.PathLike[str] | None = None,
    *,
    teacher_cache: str | os.PathLike[str] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    inplace: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: Callable[[int, int, torch.nn.Module], None] | None = None,
) -> HealResult:
    """Heal ``model`` (a pruned student) by distillation from ``teacher`` (its dense model) on calibration text.

    Trains a copy (``inplace``: the model itself) as ``config`` says and returns it with LoRA adapters merged.
    With ``out`` the healed model is saved there like any pruned folder, with ``report`` (the student's own)
    extended by a ``heal`` section, and ``heal.png``. Resumable state (checkpoints, and the teacher cache unless
    ``teacher_cache`` names one to share) lives in ``state_dir``, by default ``OUT.heal-state`` beside ``out``;
    it is removed when the run ends. ``teacher`` is the dense model, or a function that loads it: then it is held
    only while the cache is filled, and training needs no memory for it. It may be None when ``teacher_cache``
    already holds every sequence the run reads. With ``config.fsdp`` and ``inplace``, a run that fails leaves the
    model's decoder layers released (on the meta device).
    """
    config = validate_heal_config(config)
    if config.fsdp:
        check_shardable(config.batch_size)
    say = log or (lambda message: None)
    out_path = Path(out).expanduser().absolute() if out is not None else None
    if out_path is not None and distributed.is_rank0():
        prepare_out_dir(out_path, overwrite)
    text = heal_text(tokenizer, config.seq_len, config.held_out_fraction, config.dataset, config.data_dir)
    _check_vocabulary(model, text, "model")
    if config.teacher_logits == "live":
        teacher = _materialize(teacher)
        if teacher is None:
            raise InvalidInputError("--teacher-logits live needs the teacher model")
    scratch = False
    if state_dir is not None:
        state = Path(state_dir).expanduser().absolute()
    elif out_path is not None:
        state = out_path.parent / f"{out_path.name}{STATE_SUFFIX}"
    else:  # a scratch folder of rank 0's, which every rank reads (the ranks share a machine or a file system)
        scratch = True
        made = tempfile.mkdtemp(prefix="layerprune-heal-") if distributed.is_rank0() else None
        state = Path(distributed.broadcast_object(made))
    restore_interrupted(state / CHECKPOINT_DIR)  # a kill between the two renames of a checkpoint swap
    has_checkpoint = (state / CHECKPOINT_DIR / PROGRESS_FILE).is_file()
    if resume and not has_checkpoint:
        raise InvalidInputError(f"--resume: no checkpoint in {state / CHECKPOINT_DIR}")
    if has_checkpoint and not resume:
        raise InvalidInputError(f"{state} holds a checkpoint of an unfinished run: pass --resume to continue it, "
                                "or remove the folder to start again")
    try:
        return _run(model, teacher, tokenizer, config, out_path, text, state, teacher_cache, resume, report,
                    overwrite, progress, inplace, say, on_step)
    finally:
        if scratch and distributed.is_rank0():
            shutil.rmtree(state, ignore_errors=True)


def _run(model: torch.nn.Module, teacher: TeacherSource, tokenizer: Any, config: HealConfig,
         out_path: Path | None, text: HealText, state: Path, teacher_cache: Any, resume: bool,
         report: dict[str, Any] | None, overwrite: bool, progress: bool, inplace: bool,
         say: Callable[[str], None], on_step: Callable[[int, int, torch.nn.Module], None] | None) -> HealResult:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    state.mkdir(parents=True, exist_ok=True)
    cache, teacher_fingerprint, cache_seconds, computed = None, None, 0.0, 0
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if config.teacher_logits == "cached":
        folder = Path(teacher_cache).expanduser().absolute() if teacher_cache is not None else state / TEACHER_DIR
        cache, teacher_fingerprint, cache_seconds, computed = _teacher_cache(teacher, text, config, folder, vocab,
                                                                             progress)
        teacher = None  # training needs the cache alone
        say(f"teacher cache: {folder} ({computed} sequences computed, {cache_seconds:.1f} s)")
    else:
        assert isinstance(teacher, torch.nn.Module)
        _check_vocabulary(teacher, text, "teacher")
        teacher_fingerprint = model_fingerprint(teacher)
        teacher.eval()
    student_fingerprint = model_fingerprint(model)
    student = model if inplace else copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad_(not config.lora)
    if config.lora:
        with torch.random.fork_rng(devices=[]):  # the adapters' initial A from the run's seed alone
            torch.manual_seed(config.seed)
            student = add_lora(student, config.lora_rank, config.lora_alpha, config.lora_dropout)
    if config.gradient_checkpointing:
        if not getattr(student, "supports_gradient_checkpointing", False):
            raise InvalidInputError("--gradient-checkpointing: this model class does not support it")
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    # with fsdp a sharded twin trains, and its weights come back into the plain student at the end
    device = _device_of(student)
    trained = student
    if config.fsdp:
        trained = shard_decoder_layers(copy.deepcopy(student), config.batch_size)
        release_decoder_layers(student)
    trainer = HealTrainer(trained, teacher, cache, text, config)
    identity = {"config": {k: v for k, v in config.to_dict().items() if k not in ("checkpoint_every",)},
                "text": tokens_fingerprint(text.train), "student": student_fingerprint,
                "teacher": teacher_fingerprint, "world_size": distributed.world_size()}
    history: dict[str, list[list[float]]] = {"train": [], "held_out": []}
    first_step, best_loss, best_step, waited, stopped_early = 0, math.inf, -1, 0, False
    train_seconds = 0.0
    if resume:
        saved = _read_checkpoint(state, trainer, identity)
        first_step, history = int(saved["step"]), saved["history"]
        best_loss = math.inf if saved["best_loss"] is None else float(saved["best_loss"])
        best_step, waited, train_seconds = int(saved["best_step"]), int(saved["waited"]), float(saved["train_seconds"])
        stopped_early = bool(saved.get("stopped_early", False))
        say(f"resumed at step {first_step} of {config.steps}")
        before = saved["before"]
    else:
        before = trainer.evaluate()
        history["held_out"].append([0, 0, before["loss"], before["kl"], before["ppl"]])
    tokens_per_step = config.batch_size * config.seq_len
    bar = tqdm(total=config.steps, initial=first_step, desc="heal", unit="step", disable=not progress, leave=False)
    step = first_step
    try:
        while step < config.steps and not stopped_early:
            t0 = time.perf_counter()
            loss = trainer.train_step(step)
            train_seconds += time.perf_counter() - t0
            step += 1
            history["train"].append([step, step * tokens_per_step, loss, learning_rate(step - 1, config)])
            postfix = {"loss": f"{loss:.4f}", "tok/s": f"{(step - first_step) * tokens_per_step / max(train_seconds, 1e-9):.0f}"}
            if step % config.eval_interval == 0 or step == config.steps:
                held = trainer.evaluate()
                history["held_out"].append([step, step * tokens_per_step, held["loss"], held["kl"], held["ppl"]])
                if held["loss"] < best_loss:
                    best_loss, best_step, waited = held["loss"], step, 0
                    if config.patience is not None:
                        _save_best(state, trainer)
                else:
                    waited += 1
                    stopped_early = config.patience is not None and waited >= config.patience
            if history["held_out"]:
                postfix["val"] = f"{history['held_out'][-1][2]:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if (step % config.checkpoint_interval == 0 or stopped_early) and step < config.steps:
                _write_checkpoint(state, trainer, {
                    "identity": identity, "step": step, "history": history, "best_loss": best_loss,
                    "best_step": best_step, "waited": waited, "train_seconds": train_seconds, "before": before,
                    "stopped_early": stopped_early})
            fault_point("heal-step")
            if on_step is not None:
                on_step(step, step * tokens_per_step, trained)
                trained.train()
    finally:
        bar.close()
    last = history["held_out"][-1]
    after = {"loss": last[2], "kl": last[3], "ppl": last[4]} if last[0] == step else None
    if config.patience is not None and best_step not in (-1, step) and (state / BEST_FILE).is_file():
        from safetensors.torch import load_file

        trainer.load_trainable(load_file(str(state / BEST_FILE)))
        say(f"kept the weights of step {best_step}, the best held-out loss")
        after = None
    if after is None:
        after = trainer.evaluate()
    trainable_parameters = sum(p.numel() for _, p in trainer.named)
    if trained is not student:
        copy_back(student, trained, device)
        del trainer, trained
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    if config.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    healed = merge_lora(student) if config.lora else student
    if cache is not None:
        cache.close()
    tokens_seen = step * tokens_per_step
    section = {
        "config": config.to_dict(),
        "peak_lr": config.peak_lr,
        "text": text.source,
        "train_sequences": int(text.train.shape[0]),
        "held_out_sequences": int(text.held_out.shape[0]),
        "teacher": teacher_fingerprint,
        "student": student_fingerprint,
        "trainable_parameters": trainable_parameters,
        "steps": step,
        "tokens": tokens_seen,
        "train_seconds": round(train_seconds, 3),
        "teacher_cache_seconds": round(cache_seconds, 3),
        "teacher_sequences_computed": computed,
        "seconds": round(time.perf_counter() - started, 3),
        "tokens_per_second": tokens_seen / train_seconds if train_seconds > 0 else None,
        "held_out_before": before,
        "held_out_after": after,
        "best_step": best_step,
        "stopped_early": stopped_early,
        "history": history,
        "run": distributed.run_environment("heal", _device_of(healed)),
    }
    full_report = {**(report or {}), "heal": section}
    saved_to = None
    if out_path is not None and distributed.is_rank0():
        from layerprune.report.plots import plot_heal

        saved_to = save_pruned(healed, tokenizer, out_path, report=full_report, overwrite=overwrite)
        plot_heal(history, saved_to / PLOT_FILE)
    distributed.barrier("healed")
    if distributed.is_rank0() and state.name.endswith(STATE_SUFFIX):
        shutil.rmtree(state, ignore_errors=True)
    elif distributed.is_rank0():
        shutil.rmtree(state / CHECKPOINT_DIR, ignore_errors=True)
        (state / BEST_FILE).unlink(missing_ok=True)
    return HealResult(healed, full_report, saved_to)


__all__ = ["HealResult", "HealTrainer", "STATE_SUFFIX", "body_and_head", "heal", "learning_rate", "sequences_read",
           "step_sequences"]
