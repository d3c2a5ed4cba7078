"""The distillation loss fused with the language-model head, computed over chunks of positions.

The student's logits z = h Wᵀ + b are never held whole ([positions, vocabulary] floats: 400 MB for 2,048
positions of a 49k vocabulary); each chunk's logits are formed, turned into the loss and its gradient, and
dropped, as Liger-Kernel's fused linear cross-entropy does for the cross-entropy. The gradient is written in
closed form. With q = softmax(z / T), the teacher's top-K probabilities p_k and tail masses p_t, q_t:

    ∂ KL / ∂(z_j / T) = q_j − p_j                 for j among the teacher's K tokens,
    ∂ KL / ∂(z_j / T) = q_j (1 − p_t / q_t)       for every other token,

and the loss T² · KL has gradient T · that with respect to z. Cross-entropy at T = 1 adds softmax(z) − onehot.
With a soft cap (Gemma 2) the logits are ``c · tanh(z / c)`` of the head's ``z``, and the gradient is multiplied by
their slope ``1 − tanh²(z / c)``.
``tests/test_heal.py`` checks the loss and the gradients against autograd through :func:`top_k_kl`.
"""

from __future__ import annotations

from typing import Any

import torch

from layerprune.healing.losses import log1m_exp, tail_log_mass

CHUNK_POSITIONS = 256  # positions per chunk of logits (256 x 49,152 floats: 48 MiB)


def _chunk_terms(z: torch.Tensor, log_p: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor | None,
                 temperature: float, ce_weight: float, want_grad: bool) -> tuple[float, float, torch.Tensor | None]:
    """(Σ KL · T², Σ cross-entropy, ∂(T² KL + ce_weight CE)/∂z) of one chunk of float32 logits ``z``, which it
    overwrites (the gradient is built in its memory: one chunk of logits is the only large buffer)."""
    ce = 0.0
    if labels is not None and temperature != 1.0:  # the text's cross-entropy is at temperature 1
        lse1 = torch.logsumexp(z, dim=-1)
        ce = float((lse1 - torch.gather(z, -1, labels[:, None])[:, 0]).sum())
        q1 = torch.exp(z - lse1[:, None]) if want_grad and ce_weight else None
    if temperature != 1.0:
        z.div_(temperature)
    lse = torch.logsumexp(z, dim=-1)
    log_q_k = torch.gather(z, -1, ids) - lse[:, None]
    if labels is not None and temperature == 1.0:
        ce = float((lse - torch.gather(z, -1, labels[:, None])[:, 0]).sum())
    p = log_p.exp()
    kl_rows = (p * (log_p - log_q_k)).sum(-1)
    partial = log_p.shape[-1] < z.shape[-1]
    if partial:
        log_p_t = log1m_exp(torch.logsumexp(log_p, dim=-1))
        log_q_t = tail_log_mass(z, ids) - lse  # exact: 1 − Σ_k q_k rounds to 0 where the K tokens hold it all
        p_t = log_p_t.exp()
        kl_rows = kl_rows + torch.where(p_t > 0, p_t * (log_p_t - log_q_t), torch.zeros_like(p_t))
    kl = float(kl_rows.sum()) * temperature**2
    if not want_grad:
        return kl, ce, None
    grad = z.sub_(lse[:, None]).exp_()  # q, in the logits' memory
    q_k = torch.gather(grad, -1, ids)
    t = temperature
    # at T = 1 the cross-entropy's softmax is q itself: its ce_weight · q joins the KL's gradient in one pass
    same_q = ce_weight if (ce_weight and labels is not None and t == 1.0) else 0.0
    if partial:
        ratio = torch.exp(log_p_t - log_q_t).clamp(max=torch.finfo(torch.float32).max)
        grad.mul_((t * (1.0 - ratio) + same_q)[:, None])
        grad.scatter_(-1, ids, t * (q_k - p) + same_q * q_k)
    else:
        if t + same_q != 1.0:
            grad.mul_(t + same_q)
        grad.scatter_add_(-1, ids, -t * p)
    if ce_weight and labels is not None:
        if t != 1.0:
            grad.add_(q1, alpha=ce_weight)
        grad.scatter_add_(-1, labels[:, None], torch.full_like(labels[:, None], -ce_weight, dtype=grad.dtype))
    return kl, ce, grad


class _FusedHeadDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, log_p: torch.Tensor,
                ids: torch.Tensor, labels: torch.Tensor, temperature: float, ce_weight: float,
                compute_dtype: torch.dtype, softcap: float | None) -> torch.Tensor:
        want_grad = any(ctx.needs_input_grad[:3])
        w = weight.to(compute_dtype)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if bias is not None and ctx.needs_input_grad[2] else None)
        kl = ce = 0.0
        for start in range(0, hidden.shape[0], CHUNK_POSITIONS):
            h = hidden[start : start + CHUNK_POSITIONS].to(compute_dtype)
            z = (h @ w.T).float()
            if bias is not None:
                z += bias.float()
            slope = None
            if softcap is not None:
                z.div_(softcap).tanh_()
                slope = 1.0 - z * z if want_grad else None
                z.mul_(softcap)
            k, c, g = _chunk_terms(z, log_p[start : start + CHUNK_POSITIONS].float(),
                                   ids[start : start + CHUNK_POSITIONS], labels[start : start + CHUNK_POSITIONS],
                                   temperature, ce_weight, want_grad)
            kl, ce = kl + k, ce + c
            if g is None:
                continue
            if slope is not None:
                g.mul_(slope)
            gc = g.to(compute_dtype)
            if grad_h is not None:
                grad_h[start : start + h.shape[0]] = (gc @ w).to(grad_h.dtype)
            if grad_w is not None:
                grad_w += (gc.T @ h).float()
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.grads = (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype))  # type: ignore[union-attr]
        return torch.tensor([kl + ce_weight * ce, kl, ce], dtype=torch.float64)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        scale = grad_out[0]
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        scaled = [None if g is None else g * scale.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*scaled, None, None, None, None, None, None, None)


def fused_head_distillation(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_log_probs: torch.Tensor,
    teacher_ids: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
    softcap: float | None = None,
) -> torch.Tensor:
    """[Σ (T² KL + ce_weight · CE), Σ T² KL, Σ CE] over positions, float64, differentiable through its first entry.

    ``hidden`` [N, d] are the final hidden states, ``weight`` [V, d] / ``bias`` the head, the teacher's arrays
    [N, K] (:func:`~layerprune.healing.losses.teacher_top_k`), ``labels`` [N] the next tokens. The matmuls run in
    ``compute_dtype`` (bfloat16 under autocast), the softmax in float32. ``softcap``: the student's logits are
    ``softcap · tanh(z / softcap)``.
    """
    return _FusedHeadDistillation.apply(hidden, weight, bias, teacher_log_probs, teacher_ids.long(), labels.long(),
                                        float(temperature), float(ce_weight), compute_dtype,
                                        None if softcap is None else float(softcap))


__all__ = ["CHUNK_POSITIONS", "fused_head_distillation"]
