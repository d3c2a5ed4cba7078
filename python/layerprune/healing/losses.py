"""Distillation losses: KL(teacher ‖ student) (:mod:`layerprune.importance.divergence`, shared with the allocation
search) and the text's own cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerprune.importance.divergence import full_kl, log1m_exp, tail_log_mass, teacher_top_k, top_k_kl


def token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions of −log q(label) at temperature 1 (the text's own loss, mixed in by ``ce_weight``)."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                           reduction="sum")


__all__ = ["full_kl", "log1m_exp", "tail_log_mass", "teacher_top_k", "token_cross_entropy", "top_k_kl"]
