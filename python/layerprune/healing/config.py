"""What a healing run does (:class:`HealConfig`), its defaults, and the checks made once, at the entry point."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from layerprune.data import WIKITEXT2
from layerprune.errors import InvalidInputError

TEACHER_LOGITS = ("cached", "live")
PRECISIONS = ("float32", "bfloat16")
# Peak learning rates when none is given (AdamW, warm-up then cosine decay).
FULL_LR = 2e-4
LORA_LR = 2e-4


@dataclass(frozen=True)
class HealConfig:
    """How to heal a pruned student by distillation from its dense teacher.

    The loss is T² · KL(teacher ‖ student) on the next-token distributions (:mod:`layerprune.healing.losses`),
    plus ``ce_weight`` times the text's cross-entropy. ``teacher_logits="cached"`` runs the teacher once and keeps
    its ``top_k`` log-probabilities on disk; ``"live"`` runs it at every step. ``tokens`` counts the training
    tokens read (``batch_size`` sequences of ``seq_len`` per optimizer step). Under torchrun the ranks share
    each step's sequences; ``fsdp`` also shards the decoder layers over them (:mod:`layerprune.healing.sharding`).
    """

    tokens: int = 262_144
    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step, over every rank
    micro_batch_size: int | None = None  # sequences per forward pass (gradient accumulation); None: batch_size
    lr: float | None = None  # None: FULL_LR, or LORA_LR with lora
    min_lr_ratio: float = 0.1  # the cosine decays to lr × this
    warmup: float = 0.05  # fraction of the steps with a linear warm-up
    weight_decay: float = 0.0  # AdamW's, on matrices only
    max_grad_norm: float | None = 1.0
    temperature: float = 1.0
    top_k: int = 64
    teacher_logits: str = "cached"
    ce_weight: float = 0.0
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    precision: str = "float32"  # bfloat16: autocast, the weights and AdamW's state stay float32
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard the decoder layers' weights, gradients and AdamW state (FSDP2)
    held_out_fraction: float = 0.05
    eval_every: int | None = None  # optimizer steps between held-out evaluations; None: about 8 per run
    checkpoint_every: int | None = None  # steps between resumable checkpoints; None: at every evaluation
    patience: int | None = None  # evaluations without a better held-out loss before stopping; None: never stop
    seed: int = 0
    dataset: str = WIKITEXT2
    data_dir: str | None = None

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (LORA_LR if self.lora else FULL_LR)

    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, math.ceil(self.steps / 8))

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_interval

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(name: str, value: Any, flag: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"{flag} must be a positive integer; got {value!r}")


def validate_heal_config(config: HealConfig) -> HealConfig:
    """Refuse a config that cannot run, in one line naming the flag."""
    _positive("tokens", config.tokens, "--tokens")
    _positive("batch_size", config.batch_size, "--batch-size")
    _positive("top_k", config.top_k, "--top-k")
    _positive("lora_rank", config.lora_rank, "--lora-rank")
    if not isinstance(config.seq_len, int) or config.seq_len < 2:
        raise InvalidInputError(f"--seq-len must be at least 2; got {config.seq_len!r}")
    if config.micro_batch_size is not None:
        _positive("micro_batch_size", config.micro_batch_size, "--micro-batch-size")
        if config.batch_size % config.micro_batch_size:
            raise InvalidInputError(f"--batch-size {config.batch_size} is not a multiple of --micro-batch-size "
                                    f"{config.micro_batch_size}")
    for name, flag in (("eval_every", "--eval-every"), ("checkpoint_every", "--checkpoint-every"),
                       ("patience", "--patience")):
        value = getattr(config, name)
        if value is not None:
            _positive(name, value, flag)
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise InvalidInputError(f"--lr must be positive; got {config.lr}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise InvalidInputError(f"--min-lr-ratio must be in [0, 1]; got {config.min_lr_ratio}")
    if not 0.0 <= config.warmup < 1.0:
        raise InvalidInputError(f"--warmup must be in [0, 1); got {config.warmup}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise InvalidInputError(f"--weight-decay must be non-negative; got {config.weight_decay}")
    if config.max_grad_norm is not None and not (math.isfinite(config.max_grad_norm) and config.max_grad_norm > 0):
        raise InvalidInputError(f"--max-grad-norm must be positive; got {config.max_grad_norm}")
    if not (math.isfinite(config.temperature) and config.temperature > 0):
        raise InvalidInputError(f"--temperature must be positive; got {config.temperature}")
    if not (math.isfinite(config.ce_weight) and config.ce_weight >= 0):
        raise InvalidInputError(f"--ce-weight must be non-negative; got {config.ce_weight}")
    if config.teacher_logits not in TEACHER_LOGITS:
        raise InvalidInputError(f"--teacher-logits must be one of {', '.join(TEACHER_LOGITS)}; got "
                                f"{config.teacher_logits!r}")
    if config.precision not in PRECISIONS:
        raise InvalidInputError(f"--precision must be one of {', '.join(PRECISIONS)}; got {config.precision!r}")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise InvalidInputError(f"--lora-dropout must be in [0, 1); got {config.lora_dropout}")
    if not (math.isfinite(config.lora_alpha) and config.lora_alpha > 0):
        raise InvalidInputError(f"--lora-alpha must be positive; got {config.lora_alpha}")
    if not 0.0 < config.held_out_fraction < 0.5:
        raise InvalidInputError(f"--held-out must be in (0, 0.5); got {config.held_out_fraction}")
    return config


__all__ = ["FULL_LR", "HealConfig", "LORA_LR", "PRECISIONS", "TEACHER_LOGITS", "validate_heal_config"]
