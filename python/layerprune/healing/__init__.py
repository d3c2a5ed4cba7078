"""Healing: recover a pruned model's quality by distillation from its dense model (full-parameter or LoRA),
with the teacher's top-K distributions cached on disk and resumable checkpoints."""

from layerprune.healing.config import FULL_LR, LORA_LR, PRECISIONS, TEACHER_LOGITS, HealConfig, validate_heal_config
from layerprune.healing.losses import full_kl, teacher_top_k, token_cross_entropy, top_k_kl
from layerprune.healing.teacher_cache import (
    TeacherCache,
    expected_meta,
    model_fingerprint,
    open_teacher_cache,
)
from layerprune.healing.text import HealText, heal_text
from layerprune.healing.trainer import STATE_SUFFIX, HealResult, heal, learning_rate, step_sequences

__all__ = [
    "FULL_LR",
    "LORA_LR",
    "PRECISIONS",
    "STATE_SUFFIX",
    "TEACHER_LOGITS",
    "HealConfig",
    "HealResult",
    "HealText",
    "TeacherCache",
    "expected_meta",
    "full_kl",
    "heal",
    "heal_text",
    "learning_rate",
    "model_fingerprint",
    "open_teacher_cache",
    "step_sequences",
    "teacher_top_k",
    "token_cross_entropy",
    "top_k_kl",
    "validate_heal_config",
]
