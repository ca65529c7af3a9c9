"""SpecForge 0.2.0's EAGLE-3 training step on specfast's kernels.

    import specfast.integrations.specforge as sf
    sf.patch()      # before or after building SpecForge's model; undo with sf.unpatch()

What changes, inside `OnlineEagle3Model.forward` only (SpecForge's inference and eval paths, and
every other algorithm, are untouched):

- The head and loss: `compute_logits` hands back the normed hidden state and the lm_head weight
  instead of the [B, L, V_draft] logits, and each TTT step's loss is `pruned_vocab_loss` over them
  (logits formed tile by tile, never kept whole with their gradient). SpecForge's KL loss is
  Σ mask·CE / (B·L); specfast's kernel divides by Σ mask, so the result is rescaled to SpecForge's
  normalisation: same loss, same gradients. The teacher is SpecForge's own `target_p`, passed as
  log-probabilities. Accuracy comes from the kernel's argmax; the acceptance-rate metric is
  computed without a gradient in row chunks (`acceptance_rate=False` skips it).
- Attention (the "sdpa" backend's TTT path): `ttt_attention` over the cached step keys (causal on
  step 0, diagonal on the later steps), instead of the [B, H, L, L + k] score tensor per step.
  SpecForge's mask there is causal plus right padding; padded rows only ever see padded rows'
  outputs and carry no loss, so dropping the mask changes no loss or gradient.

Left as they are (the original code runs): the LK losses (`lk_loss_type` set: they differentiate
through the acceptance rate, which needs the full logits), the flex_attention / fa / usp backends,
and multimodal RoPE.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()
_saved: dict = {}
ACCEPT_CHUNK_ROWS = 1024


class DraftHead:
    """What the patched `compute_logits` returns: the normed hidden state [B, L, H] and the
    lm_head weight [V, H], for the fused loss to form the logits itself."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.hidden, self.weight = hidden, weight

    def logits(self) -> torch.Tensor:
        return self.hidden @ self.weight.t()


@contextlib.contextmanager
def _fused_head():
    prev = getattr(_state, "on", False)
    _state.on = True
    try:
        yield
    finally:
        _state.on = prev


def patch(acceptance_rate: bool = True) -> None:
    """Route SpecForge's EAGLE-3 training step through specfast's kernels (idempotent)."""
    import specforge.algorithms.eagle3.model as em
    import specforge.modeling.draft.llama3_eagle as le

    _state.acceptance_rate = acceptance_rate
    if _saved:
        return
    _saved.update(
        forward=em.OnlineEagle3Model.forward,
        acc_and_loss=em.OnlineEagle3Model._acc_and_loss,
        compute_logits=le.LlamaForCausalLMEagle3.compute_logits,
        attention=le.LlamaAttention.forward,
    )
    orig_forward, orig_acc = _saved["forward"], _saved["acc_and_loss"]
    orig_logits, orig_attention = _saved["compute_logits"], _saved["attention"]

    def forward(self, *args, **kwargs):
        if self.lk_loss_type is not None:  # LK losses need the full logits' gradient
            return orig_forward(self, *args, **kwargs)
        with _fused_head():
            return orig_forward(self, *args, **kwargs)

    def compute_logits(self, hidden_states):
        if not getattr(_state, "on", False):
            return orig_logits(self, hidden_states)
        normed = self.norm(hidden_states) if self.norm_output else hidden_states
        return DraftHead(normed, self.lm_head.weight)

    def acc_and_loss(self, *, logits, **kw):
        if not isinstance(logits, DraftHead):
            return orig_acc(self, logits=logits, **kw)
        return _fused_acc_and_loss(self, logits, **kw)

    def attention(self, hidden_states, cache_hidden=None, attention_mask=None, **kw):
        if cache_hidden is None or isinstance(self.rotary_emb, le.LlamaMutiRotaryEmbedding):
            return orig_attention(self, hidden_states, cache_hidden, attention_mask, **kw)
        return _ttt_attention_forward(self, le, hidden_states, cache_hidden, kw["position_ids"])

    em.OnlineEagle3Model.forward = forward
    em.OnlineEagle3Model._acc_and_loss = acc_and_loss
    le.LlamaForCausalLMEagle3.compute_logits = compute_logits
    le.LlamaAttention.forward = attention


def unpatch() -> None:
    """Restore SpecForge's own code."""
    if not _saved:
        return
    import specforge.algorithms.eagle3.model as em
    import specforge.modeling.draft.llama3_eagle as le

    em.OnlineEagle3Model.forward = _saved["forward"]
    em.OnlineEagle3Model._acc_and_loss = _saved["acc_and_loss"]
    le.LlamaForCausalLMEagle3.compute_logits = _saved["compute_logits"]
    le.LlamaAttention.forward = _saved["attention"]
    _saved.clear()


def _fused_acc_and_loss(
    model, head: DraftHead, *, target_p, target_p_on_draft, target_token_ids, position_mask,
    loss_mask, adapter,
):  # fmt: skip
    """SpecForge's `_acc_and_loss` contract (acc, acceptance rate, loss, correct, denom, metric
    loss, loss denom) from the fused kernel."""
    from specforge.core.lk_loss import _acceptance_rate_per_token_from_logits, _masked_mean

    from specfast.kernels import pruned_vocab_loss

    b, length, width = head.hidden.shape
    rows = b * length
    hidden = head.hidden.reshape(rows, width)
    mask = position_mask.reshape(rows).bool()
    teacher = target_p.reshape(rows, -1).float().log()  # softmax(log p) = p
    loss, correct = pruned_vocab_loss(hidden, head.weight, teacher, mask)
    # specfast normalises by the supervised rows, SpecForge by every row of the batch.
    loss = loss * mask.sum().clamp(min=1).float() / rows
    if adapter.reduce_loss is not None:
        loss = adapter.reduce_loss(loss)
    with torch.no_grad():
        # The draft's pick equals the target's only where the target's lies in the draft
        # vocabulary, i.e. on position_mask (= loss_mask · t2d[target id]).
        local_correct = (correct & mask).sum()
        local_denom = loss_mask.sum().clamp_min(1e-6)
        local_correct, local_denom = adapter.reduce_metrics(
            local_correct=local_correct, local_denom=local_denom
        )
        acc = local_correct / local_denom
        if getattr(_state, "acceptance_rate", True):
            flat_p = target_p_on_draft.reshape(rows, -1)
            per_token = torch.cat(
                [
                    _acceptance_rate_per_token_from_logits(
                        logits=(hidden[i : i + ACCEPT_CHUNK_ROWS] @ head.weight.t()),
                        target_probs=flat_p[i : i + ACCEPT_CHUNK_ROWS],
                    )
                    for i in range(0, rows, ACCEPT_CHUNK_ROWS)
                ]
            ).reshape(b, length)
            acceptance = _masked_mean(
                values_per_token=per_token,
                position_mask=position_mask,
                eps=1e-8,
                reduce_fn=adapter.reduce_metrics,
            )
        else:
            acceptance = torch.zeros((), device=hidden.device)
    denom = torch.tensor(rows, device=hidden.device, dtype=torch.float32)
    return acc, acceptance, loss, local_correct, local_denom, loss.detach(), denom


def _ttt_attention_forward(attn, le, hidden_states, cache_hidden, position_ids):
    """SpecForge's sdpa TTT attention step with the fused kernel: same projections and RoPE
    (positions offset by the step), keys and values cached per step without repeating the
    key-value heads (the kernel handles grouped-query attention)."""
    from specfast.kernels import ttt_attention

    bsz, q_len, _ = hidden_states.size()

    def heads(x, n):
        return x.view(bsz, q_len, n, attn.head_dim).transpose(1, 2)

    q = heads(attn.q_proj(hidden_states), attn.num_heads)
    k = heads(attn.k_proj(hidden_states), attn.num_key_value_heads)
    v = heads(attn.v_proj(hidden_states), attn.num_key_value_heads)
    step = len(cache_hidden[0])
    cos, sin = attn.rotary_emb(q, seq_len=q_len + step)
    q, k = le.apply_rotary_pos_emb(q, k, cos.to(q.device), sin.to(q.device), position_ids + step)
    cache_hidden[0] = cache_hidden[0] + [k]
    cache_hidden[1] = cache_hidden[1] + [v]
    out = ttt_attention(
        q, torch.stack(cache_hidden[0]), torch.stack(cache_hidden[1]), scale=attn.head_dim**-0.5
    )
    out = out.transpose(1, 2).reshape(bsz, q_len, attn.num_heads * attn.head_dim)
    return attn.o_proj(out)
