"""Training-time test (TTT): the draft unrolled `steps` times on a packed row, feeding back its own
hidden state — the one place that defines specfast's EAGLE-3 training semantics.

A packed row holds T tokens x[0..T) from several documents (doc[t]); the target gave, per token t,
the aux hidden state a[t] (it has read x[0..t]) and the teacher distribution p[t] over the draft
vocabulary for the *next* token x[t+1]. label[t] says token t is an assistant token.

At step k (0-based), row position t:
    input token      x[t+1+k]                  (the token the target would have just produced)
    input hidden     fc(a[t]) if k == 0, else the step k-1 hidden output at t (before `norm`)
    RoPE position    pos[t] + k                (pos = position within the document)
    predicts         x[t+2+k], taught by p[t+1+k]
    supervised iff   t+2+k is in t's document, label[t+2+k], and the target's full-vocabulary argmax
                     at t+1+k is in the draft vocabulary
    attends to       step-0 keys at positions j ≤ t of its own document, and the keys of steps
                     1..k at position t only ("causal + k diagonals",
                     specfast.kernels.ttt_attention)

Worked example, one document "A B C D E" (t = 0..4), steps = 2:
    step 0, t=0: token B, hidden fc(a[0]), pos 0, predicts C (teacher p[1]);
                 attends step-0 key 0
    step 0, t=2: token D, hidden fc(a[2]), pos 2, predicts E (teacher p[3]);
                 attends step-0 keys 0..2
    step 1, t=0: token C, hidden h0[0],    pos 1, predicts D (teacher p[2]);
                 attends step-0 key 0, step-1 key 0
    step 1, t=2: token E, predicts x[5]: outside the document, not supervised
This is what inference does: after the target emits B from prefix "A", the draft reads (B, a[0]) to
propose C, then (C, its own hidden) to propose D, each step one position further.

Loss: Σ_k 0.8^k · loss_k, loss_k the soft cross-entropy over step k's supervised positions divided
by their count (not by B·T). Metrics per step: accuracy, conditional accuracy (given steps 0..k-1
right at that position), and the simulated acceptance length τ = 1 + Σ_k Π_{j≤k} cond_acc_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfast.kernels import pruned_vocab_loss, ttt_attention
from specfast.model.draft import Eagle3Draft

STEP_WEIGHT_DECAY = 0.8


@dataclass
class PackedBatch:
    """One packed row of T tokens and what the target said about it."""

    input_ids: torch.Tensor  # int64 [T]
    doc_ids: torch.Tensor  # int64 [T], contiguous runs numbered 0, 1, 2, …
    positions: torch.Tensor  # int64 [T], position within the document
    loss_mask: torch.Tensor  # bool [T], token t is an assistant token
    aux_hidden: torch.Tensor  # [T, 3·H_target]
    teacher_logits: (
        torch.Tensor
    )  # fp32 [T, V_draft], the target's logits at t over the draft vocabulary
    target_in_vocab: (
        torch.Tensor
    )  # bool [T], target's full-vocab argmax at t lies in the draft vocabulary

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class TTTResult:
    loss: torch.Tensor  # weighted total, differentiable
    step_losses: list[float]
    correct: torch.Tensor  # bool [steps, T]
    valid: torch.Tensor  # bool [steps, T]


def shifted(x: torch.Tensor, shift: int, fill) -> torch.Tensor:
    """x[t + shift] for every t, `fill` past the end."""
    out = torch.full_like(x, fill)
    if shift < x.numel():
        out[: x.numel() - shift] = x[shift:]
    return out


def supervised_mask(batch: PackedBatch, k: int) -> torch.Tensor:
    """Step k's supervised positions (see the module docstring)."""
    same_doc = shifted(batch.doc_ids, 2 + k, -1) == batch.doc_ids
    return (
        same_doc
        & shifted(batch.loss_mask, 2 + k, False)
        & shifted(batch.target_in_vocab, 1 + k, False)
    )


def ttt_unroll(draft: Eagle3Draft, batch: PackedBatch, steps: int) -> TTTResult:
    T = batch.num_tokens
    if steps < 1:
        raise ValueError(f"ttt steps must be ≥ 1, not {steps}")
    # One padded teacher tensor; step k reads the strided view rows t + 1 + k (no copy per step).
    V = batch.teacher_logits.shape[1]
    teacher = torch.cat([batch.teacher_logits, batch.teacher_logits.new_zeros(steps + 1, V)])
    doc_ids = batch.doc_ids[None]
    h = draft.fc(batch.aux_hidden.to(draft.fc.weight.dtype))[None]  # [1, T, H]
    keys, values = [], []

    def attend(q, k, v):
        keys.append(k)
        values.append(v)
        return ttt_attention(q, torch.stack(keys), torch.stack(values), doc_ids=doc_ids)

    total = h.new_zeros((), dtype=torch.float32)
    step_losses, correct, valid = [], [], []
    for k in range(steps):
        tokens = shifted(batch.input_ids, 1 + k, 0)[None]
        h = draft.step(tokens, h, (batch.positions + k)[None], attend)
        mask = supervised_mask(batch, k)
        loss_k, correct_k = pruned_vocab_loss(
            draft.norm(h[0]), draft.lm_head.weight, teacher[1 + k : 1 + k + T], mask
        )
        total = total + (STEP_WEIGHT_DECAY**k) * loss_k
        step_losses.append(float(loss_k.detach()))
        correct.append(correct_k)
        valid.append(mask)
    return TTTResult(total, step_losses, torch.stack(correct), torch.stack(valid))


def ttt_metrics(
    correct: torch.Tensor, valid: torch.Tensor, step_losses: list[float] | None = None
) -> dict:
    """Per-step accuracy, conditional accuracy and the simulated acceptance length, from bool
    [steps, T] tensors (sum them over batches first via `ttt_counts` for epoch-level numbers)."""
    return metrics_from_counts(ttt_counts(correct, valid), step_losses)


def ttt_counts(correct: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int64 [steps, 4]: (valid, correct, chain-valid, chain-correct) counts per step, where the
    chain at step k is the positions whose steps 0..k-1 were all supervised and right."""
    chain = torch.ones_like(valid[0])
    rows = []
    for k in range(valid.shape[0]):
        ok = correct[k] & valid[k]
        rows.append(
            torch.stack([valid[k].sum(), ok.sum(), (valid[k] & chain).sum(), (ok & chain).sum()])
        )
        chain = chain & ok
    return torch.stack(rows).cpu()


def metrics_from_counts(counts: torch.Tensor, step_losses: list[float] | None = None) -> dict:
    counts = counts.double()
    acc = (counts[:, 1] / counts[:, 0].clamp(min=1)).tolist()
    cond = (counts[:, 3] / counts[:, 2].clamp(min=1)).tolist()
    tau, run = 1.0, 1.0
    for c in cond:
        run *= c
        tau += run
    out = {"acc": acc, "cond_acc": cond, "sim_accept_len": tau, "supervised": int(counts[0, 0])}
    if step_losses is not None:
        out["step_loss"] = step_losses
    return out
