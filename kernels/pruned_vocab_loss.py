"""Pruned-vocabulary head + soft cross-entropy: the draft's lm_head over V_draft tokens against the
target's distribution restricted to the same tokens.

    loss    = Σ_t mask_t · ( −Σ_v softmax(teacher_t)_v · log_softmax(hidden_t · weightᵀ)_v ) / max(1, Σ_t mask_t)
    correct = argmax_v(hidden_t · weightᵀ) == argmax_v(teacher_t)      (ties → lowest index)
"""
import torch
import torch.nn.functional as F


def pruned_vocab_loss_reference(hidden, weight, teacher_logits, mask):
    """The definition, materialising the [T, V] logits in fp32."""
    logits = hidden.float() @ weight.float().t()
    logp = F.log_softmax(logits, dim=-1)
    p = F.softmax(teacher_logits.detach().float(), dim=-1)
    per_token = -(p * logp).sum(-1)
    m = mask.to(per_token.dtype)
    loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    correct = logits.argmax(-1) == teacher_logits.argmax(-1)
    return loss, correct


def pruned_vocab_loss(hidden, weight, teacher_logits, mask):
    """hidden [T, H], weight [V, H], teacher_logits [T, V] (may be strided), mask [T] bool.
    Returns (loss: 0-dim fp32 with grads to hidden and weight, correct: bool [T])."""
    return pruned_vocab_loss_reference(hidden, weight, teacher_logits, mask)
