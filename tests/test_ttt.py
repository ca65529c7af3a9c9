"""The TTT unroll (specfast.ttt) against an independent dense-mask reference written here with
explicit loops: which token, hidden state, RoPE position, keys and teacher row each (step, position)
uses."""

import math

import pytest
import torch

from specfast.model import DraftConfig, Eagle3Draft
from specfast.ttt import PackedBatch, ttt_metrics, ttt_unroll


def tiny_draft(vocab=50, draft_vocab=12, hidden=16, heads=4, kv_heads=2):
    cfg = DraftConfig(
        hidden_size=hidden,
        target_hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads * 2,
        intermediate_size=24,
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        aux_layer_ids=[1, 2, 3],
        rope_theta=100.0,
    )
    draft = Eagle3Draft(cfg)
    draft.set_vocab(torch.randperm(vocab)[:draft_vocab].sort().values)
    draft.attach_target(torch.randn(vocab, hidden, dtype=torch.float32))
    return draft


def random_batch(doc_lengths, vocab=50, draft_vocab=12, hidden=16):
    T = sum(doc_lengths)
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(doc_lengths)])
    positions = torch.cat([torch.arange(n) for n in doc_lengths])
    return PackedBatch(
        input_ids=torch.randint(0, vocab, (T,)),
        doc_ids=doc_ids,
        positions=positions,
        loss_mask=torch.rand(T) < 0.7,
        aux_hidden=torch.randn(T, 3 * hidden, dtype=torch.float32),
        teacher_logits=torch.randn(T, draft_vocab, dtype=torch.float32) * 3,
        target_in_vocab=torch.rand(T) < 0.85,
    )


def rotate(x, pos, inv_freq):
    """Rotate-half RoPE with explicit angle tables: [1, heads, T, hd] at positions [T]."""
    angle = pos.float()[:, None] * inv_freq
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference_unroll(draft, b: PackedBatch, steps: int, temperature: float = 1.0):
    """Dense, loop-by-loop restatement of the semantics in specfast/ttt.py's docstring."""
    T = b.input_ids.numel()
    layer, attn = draft.midlayer, draft.midlayer.self_attn
    nh, nkv, hd = attn.nh, attn.nkv, attn.hd
    h_prev = draft.fc(b.aux_hidden)  # [T, H]
    K, V = [], []  # per step: [T, nkv, hd]
    total = 0.0
    step_correct, step_valid = [], []
    for k in range(steps):
        tok = torch.tensor([int(b.input_ids[t + 1 + k]) if t + 1 + k < T else 0 for t in range(T)])
        pos = torch.tensor([int(b.positions[t]) + k for t in range(T)])
        x = torch.cat([layer.input_layernorm(draft.embed(tok)), layer.hidden_norm(h_prev)], -1)[
            None
        ]
        q = attn.q_proj(x).view(1, T, nh, hd).transpose(1, 2)  # [1, heads, T, hd]
        kk = attn.k_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        vv = attn.v_proj(x).view(1, T, nkv, hd).transpose(1, 2)
        q, kk = rotate(q, pos, draft.rotary.inv_freq), rotate(kk, pos, draft.rotary.inv_freq)
        K.append(kk[0].transpose(0, 1))
        V.append(vv[0].transpose(0, 1))
        outs = []
        for t in range(T):
            # visible keys: (step 0, j ≤ t, same doc) and (step s in 1..k, position t)
            vis = [(0, j) for j in range(t + 1) if b.doc_ids[j] == b.doc_ids[t]] + [
                (s, t) for s in range(1, k + 1)
            ]
            head_out = []
            for hq in range(nh):
                hk = hq // (nh // nkv)
                scores = torch.stack([q[0, hq, t] @ K[s][j, hk] for s, j in vis]) / math.sqrt(hd)
                p = torch.softmax(scores, 0)
                head_out.append(sum(p[n] * V[s][j, hk] for n, (s, j) in enumerate(vis)))
            outs.append(torch.cat(head_out))
        a = torch.stack(outs)  # [T, nh*hd]
        h = h_prev + attn.o_proj(a)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = draft.logits(h)
        valid = torch.tensor(
            [
                t + 2 + k < T
                and bool(b.doc_ids[t + 2 + k] == b.doc_ids[t])
                and bool(b.loss_mask[t + 2 + k])
                and bool(b.target_in_vocab[t + 1 + k])
                for t in range(T)
            ]
        )
        ce = []
        for t in range(T):
            if valid[t]:
                p = torch.softmax(b.teacher_logits[t + 1 + k] / temperature, -1)
                ce.append(-(p * torch.log_softmax(logits[t], -1)).sum())
        loss_k = torch.stack(ce).mean() if ce else logits.sum() * 0
        total = total + 0.8**k * loss_k
        teacher_arg = torch.stack(
            [b.teacher_logits[min(t + 1 + k, T - 1)] for t in range(T)]
        ).argmax(-1)
        step_correct.append(logits.argmax(-1) == teacher_arg)
        step_valid.append(valid)
        h_prev = h
    return total, torch.stack(step_correct), torch.stack(step_valid)


@pytest.mark.parametrize(
    "doc_lengths,steps", [([9], 3), ([5, 1, 7, 4], 3), ([6, 8], 1), ([3, 11], 4)]
)
def test_unroll_matches_dense_reference(seed, doc_lengths, steps):
    draft = tiny_draft()
    b = random_batch(doc_lengths)
    res = ttt_unroll(draft, b, steps)
    ref_loss, ref_correct, ref_valid = reference_unroll(draft, b, steps)
    assert torch.equal(res.valid, ref_valid)
    # argmax may legitimately differ on near-ties between two fp32 computations: allow one flip
    assert int(((res.correct ^ ref_correct) & res.valid).sum()) <= 1
    # the kernels accumulate in fp32 by definition, so fp32-level agreement is the bar
    torch.testing.assert_close(res.loss, ref_loss, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(
        res.loss, [draft.fc.weight, draft.midlayer.self_attn.q_proj.weight, draft.lm_head.weight]
    )
    g_ref = torch.autograd.grad(
        ref_loss, [draft.fc.weight, draft.midlayer.self_attn.q_proj.weight, draft.lm_head.weight]
    )
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-5)


def test_metrics_conditional_accuracy_and_tau():
    # 3 steps, 4 positions. Step 0 right at 0,1,2; step 1 right at 0,1,3; step 2 right at 0.
    correct = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    valid = torch.ones(3, 4, dtype=torch.bool)
    m = ttt_metrics(correct, valid)
    assert m["acc"] == pytest.approx([0.75, 0.75, 0.25])
    # step 1 given step 0 right (positions 0,1,2): right at 0,1 -> 2/3;
    # step 2 given 0,1 right (0,1): 1/2
    assert m["cond_acc"] == pytest.approx([0.75, 2 / 3, 0.5])
    assert m["sim_accept_len"] == pytest.approx(1 + 0.75 + 0.75 * 2 / 3 + 0.75 * 2 / 3 * 0.5)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("mask_rate", [0.2, 0.0])
def test_skipped_rows_change_nothing_when_few_rows_count(seed, mask_rate, recompute):
    """Sparse supervision (most rows skipped from steps ≥ 1 and from the head), and a batch with
    nothing supervised at all, still match the dense reference, with and without recompute."""
    draft = tiny_draft()
    b = random_batch([7, 12, 3])
    b.loss_mask = torch.rand(b.num_tokens) < mask_rate
    res = ttt_unroll(draft, b, 4, recompute=recompute)
    ref_loss, _, ref_valid = reference_unroll(draft, b, 4)
    assert torch.equal(res.valid, ref_valid)
    torch.testing.assert_close(res.loss, ref_loss, rtol=1e-5, atol=1e-5)
    if ref_valid.any():  # every weight: rows step 0 does not need skip its o_proj and MLP
        params = [p for p in draft.parameters() if p.requires_grad]
        g = torch.autograd.grad(res.loss, params, allow_unused=True)
        g_ref = torch.autograd.grad(ref_loss, params, allow_unused=True)
        for a, r in zip(g, g_ref):
            torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("teacher_bytes", [0, 1 << 30])
def test_teacher_from_hidden_and_recompute_give_the_same_step(seed, teacher_bytes, monkeypatch):
    """The teacher as final hidden + lm_head rows (formed per step, or once for the batch) equals
    the same teacher as logits; recomputing each step's layer in backward gives the same loss and
    gradients."""
    import specfast.ttt

    monkeypatch.setattr(specfast.ttt, "TEACHER_LOGITS_BYTES", teacher_bytes)
    draft = tiny_draft()
    b = random_batch([9, 6])
    hidden, weight = torch.randn(b.num_tokens, 20), torch.randn(12, 20)
    b.teacher_logits = hidden @ weight.t()
    by_hidden = PackedBatch(
        **{**vars(b), "teacher_logits": None, "teacher_hidden": hidden, "teacher_weight": weight}
    )
    params = [p for p in draft.parameters() if p.requires_grad]
    results = []
    for batch, recompute in ((b, False), (by_hidden, False), (b, True), (by_hidden, True)):
        res = ttt_unroll(draft, batch, 3, recompute=recompute)
        results.append((res.loss, torch.autograd.grad(res.loss, params)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for a, r in zip(grads, results[0][1]):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, True])
def test_static_shapes_give_the_same_step_with_shapes_fixed_by_the_bucket(seed, recompute):
    """bucket > 0 pads the row and computes every row: the same loss, gradients and metrics as
    the row-skipping unroll, and the same tensor shapes for any row length within the bucket."""
    draft = tiny_draft()
    params = [p for p in draft.parameters() if p.requires_grad]
    shapes = []

    def record(module, args):
        shapes.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))

    hook = draft.midlayer.mlp.register_forward_pre_hook(record)
    every_static = set()
    for lengths in ([7, 12, 3], [5, 6, 4, 2]):  # 22 and 17 tokens: one bucket of 24
        b = random_batch(lengths)
        b.loss_mask[torch.rand(b.num_tokens) < 0.3] = False  # some rows skipped
        # ...but not all of steps ≥ 1 (else the unroll stops after step 0): doc 0 is supervised
        b.loss_mask[: lengths[0]] = True
        b.target_in_vocab[: lengths[0]] = True
        if lengths[0] == 5:  # the teacher as final hidden state too
            hidden, weight = torch.randn(b.num_tokens, 20), torch.randn(12, 20)
            b = PackedBatch(
                **{**vars(b), "teacher_logits": None, "teacher_hidden": hidden,
                   "teacher_weight": weight}
            )  # fmt: skip
        shapes.clear()
        ref = ttt_unroll(draft, b, 4)
        dynamic_shapes = list(shapes)
        shapes.clear()
        res = ttt_unroll(draft, b, 4, recompute=recompute, bucket=24)
        static_shapes = list(shapes)
        assert torch.equal(res.valid, ref.valid) and torch.equal(res.correct, ref.correct)
        torch.testing.assert_close(res.loss, ref.loss, rtol=1e-5, atol=1e-6)
        for a, r in zip(
            torch.autograd.grad(res.loss, params), torch.autograd.grad(ref.loss, params)
        ):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
        assert len(set(static_shapes)) == 1  # every step the same shape...
        assert static_shapes[0][0][1] == 24  # ...the bucket's
        assert len(set(dynamic_shapes)) > 1  # while the skipping unroll's shrink
        every_static |= set(static_shapes)
    hook.remove()
    assert len(every_static) == 1  # and both row lengths run the very same shapes


@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_teacher_temperature_divides_the_teachers_logits(seed, form):
    """Both teacher forms, against the reference with the teacher's logits divided by it; the
    accuracies compare argmaxes, which it leaves alone."""
    draft = tiny_draft()
    b = random_batch([10, 7])
    hidden, weight = torch.randn(b.num_tokens, 20), torch.randn(12, 20)
    b.teacher_logits = hidden @ weight.t()
    batch = b
    if form == "hidden":
        by_hidden = {"teacher_logits": None, "teacher_hidden": hidden, "teacher_weight": weight}
        batch = PackedBatch(**{**vars(b), **by_hidden})
    res = ttt_unroll(draft, batch, 3, teacher_temperature=0.4)
    ref_loss, ref_correct, ref_valid = reference_unroll(draft, b, 3, temperature=0.4)
    torch.testing.assert_close(res.loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.correct, ref_correct & ref_valid)
    plain, _, _ = reference_unroll(draft, b, 3)
    assert not torch.allclose(res.loss, plain)  # the temperature changed the loss
