"""KL(teacher ‖ student) on next-token distributions, whole or from the teacher's top K: the distillation loss of
healing and the fitness of the allocation search.

Hinton et al. 2015 (*Distilling the Knowledge in a Neural Network*): both distributions are softened by a
temperature T and the loss is scaled by T² so its gradient keeps the size it has at T = 1. Minitron
(Muralidharan et al. 2024, Table 15) found KL on the logits alone the best recovery per token.

The top-K form follows EvoPress's TopK-KL (Sieberling et al. 2024): the teacher keeps its K most likely tokens
and one more outcome, "any other token", whose probability is the tail mass 1 − Σ_k p_k; the student's
distribution is folded onto the same K + 1 outcomes. With K at least the vocabulary size the tail is empty and
the loss is the full KL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def teacher_top_k(logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's K largest log-probabilities at ``temperature`` and their token ids (float32, int32), over
    the last dimension. ``top_k`` at least the vocabulary size keeps every token, in id order."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    vocab = log_p.shape[-1]
    if top_k >= vocab:
        ids = torch.arange(vocab, dtype=torch.int32, device=log_p.device).expand_as(log_p)
        return log_p, ids.contiguous()
    values, ids = torch.topk(log_p, top_k, dim=-1, sorted=False)
    return values, ids.to(torch.int32)


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def tail_log_mass(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ ids} exp(logits_v) over the last dimension, summed over the tokens outside ``ids`` itself rather
    than as 1 − Σ_{ids} (which rounds to 0, and its log to −inf, once the K tokens hold all but 1e-7 of the mass).
    A tensor outside autograd is overwritten at ``ids`` and put back (no copy of it is made)."""
    if logits.requires_grad:
        return torch.logsumexp(logits.scatter(-1, ids, float("-inf")), dim=-1)
    kept = torch.gather(logits, -1, ids)
    logits.scatter_(-1, ids, float("-inf"))
    try:
        return torch.logsumexp(logits, dim=-1)
    finally:
        logits.scatter_(-1, ids, kept)


def top_k_kl(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Σ over positions of T² · KL(p ‖ q) on the K + 1 outcomes (the teacher's top K tokens, then the rest).

    KL = Σ_k p_k (log p_k − log q_k) + p_tail (log p_tail − log q_tail), with p_tail = 1 − Σ_k p_k and
    q_tail = Σ_{v ∉ top K} q_v (:func:`tail_log_mass`); p = softmax(z_teacher / T), q = softmax(z_student / T). ``student_logits`` is
    [..., V], the teacher's arrays [..., K] (as :func:`teacher_top_k` gives them). Returns a 0-d float32 sum;
    divide by the number of positions for the mean.
    """
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = torch.gather(log_q_all, -1, teacher_ids.long())
    log_p = teacher_log_probs.float()
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    if log_p.shape[-1] < log_q_all.shape[-1]:
        log_p_tail = log1m_exp(torch.logsumexp(log_p, dim=-1))
        log_q_tail = tail_log_mass(log_q_all, teacher_ids.long())
        p_tail = log_p_tail.exp()
        tail = torch.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail))
        kl = kl + tail
    return kl.sum() * temperature**2


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Σ over positions of T² · Σ_v p_v (log p_v − log q_v), on the whole vocabulary (the reference the top-K
    loss is checked against, and the plain training loop's loss)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum") * temperature**2


__all__ = ["full_kl", "log1m_exp", "tail_log_mass", "teacher_top_k", "top_k_kl"]
