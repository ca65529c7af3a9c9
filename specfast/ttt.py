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

Positions of multimodal (mRoPE) targets. The draft is a plain-RoPE layer; `pos[t]` is the
target's own position of token t where the target has 3-D mRoPE (Qwen2.5-VL), namely its row 0
(temporal), and the position within the document otherwise (`draft_positions`). This is what
vLLM's EAGLE proposer feeds a draft whose config has no mRoPE: it copies the target's positions
and keeps `positions[0]`, and each further draft step adds 1 to it. Text tokens have three equal
rows; the tokens of an image all share the row-0 position of the image's start, and the text
after an image of h×w merged patches continues at start + max(h, w), not at start + h·w. During
decoding the target's positions are token index + the prompt's mRoPE delta. Worked example,
"A I1 I2 I3 I4 B C" with I1..I4 one image of 2×2 merged patches (token index 0..6): the target's
rows are t = 0 1 1 1 1 3 4, h = 0 1 1 2 2 3 4, w = 0 1 2 1 2 3 4, so pos = 0 1 1 1 1 3 4 and at
step k the row of B (t = 5) is at position 3 + k, not 5 + k. Speech targets (Qwen3-ASR) have
equal rows equal to the token index: the rule changes nothing there. Eval's proposer
(specfast.eval.proposer) follows the rule, and so does training: the batching pipeline passes a
target's `PackedTargetOutput.positions` into `PackedBatch.positions` (online), and capture stores
them in the shards' optional `positions` field (offline).

Loss: Σ_k 0.8^k · loss_k, loss_k the soft cross-entropy over step k's supervised positions divided
by their count (not by B·T). Metrics per step: accuracy, conditional accuracy (given steps 0..k-1
right at that position), and the simulated acceptance length τ = 1 + Σ_k Π_{j≤k} cond_acc_j.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from specfast.kernels import pruned_vocab_loss, ttt_attention
from specfast.model.draft import Eagle3Draft

STEP_WEIGHT_DECAY = 0.8
# Up to this size the teacher's logits are formed once per batch (for the rows any step reads);
# beyond it, per step from the final hidden state, so memory stays flat in T.
TEACHER_LOGITS_BYTES = 256 << 20


@dataclass
class PackedBatch:
    """One packed row of T tokens and what the target said about it. The teacher is given either
    as logits over the draft vocabulary, or (cheaper: no [T, V_draft] tensor) as the target's final
    hidden state with the draft vocabulary's rows of its lm_head."""

    input_ids: torch.Tensor  # int64 [T]
    doc_ids: torch.Tensor  # int64 [T], contiguous runs numbered 0, 1, 2, …
    positions: torch.Tensor  # int64 [T], RoPE position (draft_positions: within the document)
    loss_mask: torch.Tensor  # bool [T], token t is an assistant token
    aux_hidden: torch.Tensor  # [T, 3·H_target]
    target_in_vocab: torch.Tensor  # bool [T], the target's own argmax at t is a draft token
    teacher_logits: torch.Tensor | None = None  # fp32 [T, V_draft]: target logits at t
    teacher_hidden: torch.Tensor | None = None  # [T, H_target], after the target's final norm
    teacher_weight: torch.Tensor | None = None  # [V_draft, H_target]: lm_head rows of draft ids

    def __post_init__(self):
        if (self.teacher_logits is None) == (self.teacher_hidden is None):
            raise ValueError("PackedBatch needs teacher_logits or teacher_hidden, not both")
        if self.teacher_hidden is not None and self.teacher_weight is None:
            raise ValueError("PackedBatch: teacher_hidden needs teacher_weight")

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def teacher_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 teacher logits [len(rows), V_draft] of the given rows only."""
        if self.teacher_logits is not None:
            return self.teacher_logits[rows].float()
        with torch.autocast(self.teacher_hidden.device.type, enabled=False):  # fp32 even then
            return self.teacher_hidden[rows].float() @ self.teacher_weight.float().t()

    def with_teacher_logits_for(self, rows: torch.Tensor) -> "PackedBatch":
        """A copy whose teacher is logits, computed once for `rows` (bool [T]) and zero elsewhere:
        every TTT step reads shifted rows of the same target positions, so one matmul over their
        union replaces one per step."""
        V = self.teacher_weight.shape[0]
        logits = self.teacher_hidden.new_zeros(self.num_tokens, V, dtype=torch.float32)
        logits[rows] = self.teacher_rows(rows.nonzero()[:, 0])
        return replace(self, teacher_logits=logits, teacher_hidden=None, teacher_weight=None)


@dataclass
class TTTResult:
    loss: torch.Tensor  # weighted total, differentiable
    step_losses: list[float]
    correct: torch.Tensor  # bool [steps, T]
    valid: torch.Tensor  # bool [steps, T]


def draft_positions(
    doc_positions: torch.Tensor, target_positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The draft's step-0 RoPE positions (see "Positions of multimodal targets" in the module
    docstring): row 0 of the target's mRoPE positions where the target has them (`target_positions`
    [T] already row 0, or [3, T]), else the positions within the documents. Step k adds k."""
    if target_positions is None:
        return doc_positions
    if target_positions.dim() == 2:
        target_positions = target_positions[0]
    if target_positions.shape != doc_positions.shape:
        raise ValueError(
            f"target positions {tuple(target_positions.shape)} for {doc_positions.numel()} tokens"
        )
    return target_positions.to(doc_positions.device, doc_positions.dtype)


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


def rows_needed(supervised: torch.Tensor) -> torch.Tensor:
    """bool [steps, T]: the rows whose output step k must compute. A row's output reaches only its
    own later steps (the keys of steps ≥ 1 are attended on the diagonal alone), so it is needed iff
    some step j ≥ k supervises it. Step 0 still gives every row's key and value (later steps
    attend to them causally); the rows it does not need skip its output projection and MLP."""
    return supervised.flip(0).cummax(0).values.flip(0)


class StepAttention:
    """Step k's attention over the keys and values of every step, held in one buffer [steps, 1,
    nkv, T, hd] and written in place (no re-stacking). `rows` are the rows step k computes
    (ascending); rows it skips keep zero keys and ask with q = 0, their outputs unused."""

    def __init__(self, keys, values, k, rows, doc_ids):
        self.keys, self.values, self.k, self.rows, self.doc_ids = keys, values, k, rows, doc_ids
        self.everything = rows.numel() == keys.shape[3]

    def write(self, kk, vv):
        self.keys[self.k].index_copy_(2, self.rows, kk)
        self.values[self.k].index_copy_(2, self.rows, vv)

    def read(self, q):
        k, rows = self.k, self.rows
        if not self.everything:
            T = self.keys.shape[3]
            q = q.new_zeros(q.shape[0], q.shape[1], T, q.shape[3]).index_copy(2, rows, q)
        out = ttt_attention(q, self.keys[: k + 1], self.values[: k + 1], doc_ids=self.doc_ids)
        return out if self.everything else out[:, :, rows]

    def __call__(self, q, kk, vv):
        self.write(kk, vv)
        return self.read(q)


def _head_loss(draft, batch, teacher_at, mask, recompute, temperature, h, pick):
    """Step loss over the rows `pick` of h [1, rows, H] (all rows when None) where `mask`, taught
    by the teacher at `teacher_at` (its logits divided by `temperature`)."""
    if batch.teacher_logits is not None:
        logits = batch.teacher_logits[teacher_at]
        teacher = dict(teacher_logits=logits if temperature == 1 else logits / temperature)
    else:  # the fused loss forms teacher logits tile by tile from the final hidden state
        hidden = batch.teacher_hidden[teacher_at]  # the logits are linear in it: scale it instead
        teacher = dict(
            teacher_hidden=hidden if temperature == 1 else hidden.float() / temperature,
            teacher_weight=batch.teacher_weight,
        )
    return pruned_vocab_loss(
        draft.norm(h[0] if pick is None else h[0, pick]),
        draft.lm_head.weight,
        mask=mask,
        keep_bytes=0 if recompute else None,  # memory is the limit: keep no logits either
        **teacher,
    )


def padded(batch: PackedBatch, length: int) -> PackedBatch:
    """The batch with `length - T` rows appended as one more document that nothing supervises."""
    n = length - batch.num_tokens
    if n < 0:
        raise ValueError(f"cannot pad {batch.num_tokens} tokens to {length}")
    if n == 0:
        return batch

    def pad(x, fill=0):
        return torch.cat([x, x.new_full((n, *x.shape[1:]), fill)])

    doc = int(batch.doc_ids[-1]) + 1 if batch.num_tokens else 0
    return replace(
        batch,
        input_ids=pad(batch.input_ids),
        doc_ids=pad(batch.doc_ids, doc),
        positions=torch.cat([batch.positions, torch.arange(n, device=batch.positions.device)]),
        loss_mask=pad(batch.loss_mask, False),
        aux_hidden=pad(batch.aux_hidden),
        target_in_vocab=pad(batch.target_in_vocab, False),
        teacher_logits=None if batch.teacher_logits is None else pad(batch.teacher_logits),
        teacher_hidden=None if batch.teacher_hidden is None else pad(batch.teacher_hidden),
    )


def ttt_unroll(
    draft: Eagle3Draft,
    batch: PackedBatch,
    steps: int,
    recompute: bool = False,
    bucket: int = 0,
    teacher_temperature: float = 1.0,
) -> TTTResult:
    """The unroll of the module docstring, computing only rows that count (exactly: the rows left
    out feed nothing that is supervised). `recompute`: store each step's inputs only and recompute
    its layer in backward (memory for time).

    `bucket` > 0: static shapes, for `torch.compile` and CUDA graphs. The row is padded to a
    multiple of `bucket` tokens, every step computes every row and the head takes all rows under
    a mask, so every tensor's shape depends on the padded length alone. Same loss, gradients and
    metrics; more work than skipping rows.

    `teacher_temperature`: the teacher's logits are divided by it in every step's loss (below 1,
    sharper); the accuracy metrics compare argmaxes, which it does not change."""
    T = batch.num_tokens
    if steps < 1:
        raise ValueError(f"ttt steps must be ≥ 1, not {steps}")
    if bucket < 0:
        raise ValueError(f"bucket must be ≥ 0, not {bucket}")
    static = bucket > 0
    if static:
        batch = padded(batch, max(1, -(-T // bucket)) * bucket)
    L = batch.num_tokens
    supervised = torch.stack([supervised_mask(batch, k) for k in range(steps)])
    needed = rows_needed(supervised)
    if batch.teacher_logits is None and not static:
        teacher_rows = torch.zeros(L, dtype=torch.bool, device=supervised.device)
        for k in range(steps):
            teacher_rows[supervised[k].nonzero()[:, 0] + 1 + k] = True
        budget = 0 if recompute else TEACHER_LOGITS_BYTES
        if int(teacher_rows.sum()) * batch.teacher_weight.shape[0] * 4 <= budget:
            batch = batch.with_teacher_logits_for(teacher_rows)
    attn = draft.midlayer.self_attn
    doc_ids = batch.doc_ids[None]
    h = draft.fc(batch.aux_hidden.to(draft.fc.weight.dtype))[None]  # [1, L, H]
    # Keys and values of every step in one buffer, written in place (zeros: rows a step skips
    # must stay finite, their outputs are multiplied by zero gradients).
    kv_shape = (steps, 1, attn.nkv, L, attn.hd)
    keys, values = h.new_zeros(kv_shape), h.new_zeros(kv_shape)
    rows = torch.arange(L, device=h.device)  # the rows `h` holds, ascending

    total = h.new_zeros((), dtype=torch.float32)
    step_losses, correct = [], []
    for k in range(steps):
        if k > 0 and not static:
            keep = needed[k][rows]
            h, rows = h[:, keep], rows[keep]
            if rows.numel() == 0:  # nothing supervised from here on
                step_losses += [0.0] * (steps - k)
                correct += [torch.zeros(L, dtype=torch.bool, device=h.device)] * (steps - k)
                break
        # step 0: every row's key and value, the output of the rows some step needs (if any)
        out = needed[0] if k == 0 and not static and bool(needed[0].any()) else None
        attend = StepAttention(keys, values, k, rows, doc_ids)
        tokens = shifted(batch.input_ids, 1 + k, 0)[rows][None]
        h = draft.step(tokens, h, (batch.positions[rows] + k)[None], attend, recompute, out)
        if out is not None:
            rows = rows[out]
        # The head and loss see the supervised rows only; the loss is a mean over them.
        if static:
            pick, teacher_at = None, (rows + 1 + k).clamp(max=L - 1)
            mask = supervised[k]
        else:
            pick = supervised[k][rows]
            teacher_at = rows[pick] + 1 + k
            mask = torch.ones_like(teacher_at, dtype=torch.bool)
        head = partial(_head_loss, draft, batch, teacher_at, mask, recompute, teacher_temperature)
        if recompute:  # keep h only: the normed rows and the gathered teacher are recomputed
            loss_k, correct_rows = checkpoint(head, h, pick, use_reentrant=False)
        else:
            loss_k, correct_rows = head(h, pick)
        total = total + (STEP_WEIGHT_DECAY**k) * loss_k
        step_losses.append(float(loss_k.detach()))
        if static:
            correct.append(correct_rows & mask)
        else:
            correct.append(
                torch.zeros(L, dtype=torch.bool, device=h.device).index_fill(
                    0, (teacher_at - 1 - k)[correct_rows], True
                )
            )
    return TTTResult(total, step_losses, torch.stack(correct)[:, :T], supervised[:, :T])


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
