"""Pruned-vocabulary head + soft cross-entropy: the draft's lm_head over V_draft tokens against the
target's distribution restricted to the same tokens.

    loss    = Σ_t mask_t · ( −Σ_v softmax(teacher_t)_v · log_softmax(hidden_t · weightᵀ)_v )
              / max(1, Σ_t mask_t)
    correct = argmax_v(hidden_t · weightᵀ) == argmax_v(teacher_t)      (ties → lowest index)

The teacher comes in one of two forms:
  - `teacher_logits` [T, V] (may be strided), as the target produced them;
  - `teacher_hidden` [T, H_t] (the target's final hidden state, after its norm; may be a strided
    view) and `teacher_weight` [V, H_t] (the target's lm_head rows for the draft ids, frozen):
    teacher_t = teacher_hidden_t · teacher_weightᵀ, formed in fp32 chunk by chunk (torch) or tile
    by tile (Triton), so no [T, V] teacher tensor ever exists.

Three implementations of the same math:
  - `pruned_vocab_loss_reference`: the definition; materialises fp32 logits [T, V].
  - Triton (CUDA, or anywhere under TRITON_INTERPRET=1; `pruned_vocab_loss_triton.py`): the
    forward walks V tile by tile with an online log-sum-exp for draft and teacher, the soft-CE and
    both argmaxes; the backward recomputes each logits tile, forms
    grad_logits = (softmax(draft) − softmax(teacher))·mask, and adds its products into
    grad_hidden / grad_weight with fp32 atomics (the Cut Cross-Entropy layout).
  - chunked PyTorch (what backend="auto" runs, on CPUs and GPUs): rows in chunks, at most a few
    [chunk, V] fp32 blocks alive at a time. Up to `keep_bytes` per call, the forward keeps each
    chunk's grad_logits (it does not depend on the upstream grad but for a scalar, folded in
    later), so the backward of a kept chunk is two matmuls; chunks beyond the budget are
    recomputed in the backward as before, so memory is flat in T beyond the budget.

Work per call (T rows, H draft width, H_t teacher width, V draft vocabulary):
    forward                2·T·H·V       (+ 2·T·H_t·V from teacher_hidden)
    backward, kept chunk   4·T·H·V       (grad_hidden, grad_weight)
    backward, recomputed   6·T·H·V       (+ 2·T·H_t·V from teacher_hidden)
so a fully kept call costs 6·T·H·V, a fully recomputed one 8·T·H·V. Kept memory: fp32 T·V·4 bytes
for the kept rows, bounded by keep_bytes.

Why the Triton path keeps nothing (keep_bytes is ignored there): its forward knows a row's final
log-sum-exps only after the last V tile, so it cannot write grad_logits; the cheapest keep is the
raw draft logits (fp32, written by the forward, read by the backward instead of recomputed): 8
bytes of HBM traffic per logit to save 2·H FLOPs. At H = 576 that is 144 FLOP/byte, under an
H100's ridge point (989 TFLOP/s ÷ 3.35 TB/s ≈ 295 FLOP/byte), so recomputing on tensor cores is
the faster choice; at H = 4,096 (1,024 FLOP/byte) keeping could win, but a 128 MiB budget covers
only T·V ≤ 32 M there (T ≤ 1k at V = 32k), a small call. On CPU the GEMMs run at ~90 GFLOP/s
against tens of GB/s of memory bandwidth: keeping wins by an order of magnitude.

Measured on an H200 (bench/results/pruned_vocab_loss-cuda-h200.md): the Triton kernel ran at
most 53 TFLOP/s, under 8% of the card's ~680 TFLOP/s bf16 matmul rate, and inside a whole training
step it took ~90% of the GPU time. The chunked path's matmuls are cuBLAS's (bf16 under autocast
or for 16-bit inputs, fp32 sums): 3.4–3.7× faster at H 4,096, V 32k, 1.0–1.2× at SmolLM2's shape.
So `auto` takes it on CUDA too; the Triton kernel stays as backend="triton" until it is tuned.

The backward folds the loss scale grad_out/N in after the matmuls, so fp16 grad tiles (values in
[−1, 1]) do not underflow when N is large.
"""

import torch
import torch.nn.functional as F

from ._dispatch import env_backend, interpreting, log_once, triton_available

# Default keep budget per call of the torch path. The trainer calls this op once per TTT step
# (7 per training step) and every call's kept blocks stay alive until the backward: 7 × 128 MiB =
# 896 MiB at most, inside the 2 GB budget of a training step at T = 8,192, V = 16,384, H = 576
# (where a whole [T, V] grad would be 512 MiB per call, 3.5 GiB per step), with room left for the
# transient chunk blocks and the draft's activations. It covers the default training row whole
# (batch_tokens 2,048 × V ≤ 16,384 ≤ 128 MiB), so the default trainer never recomputes.
KEEP_BYTES = 128 << 20

# fp32 logits per chunk of the torch path (two or three such blocks alive at a time, plus the
# kept ones); fewer rows slow the CPU GEMMs.
_CHUNK_BYTES = 64 << 20


def _teacher_logits_of(teacher_logits, teacher_hidden, teacher_weight):
    if teacher_logits is not None:
        return teacher_logits.detach().float()
    return teacher_hidden.detach().float() @ teacher_weight.detach().float().t()


def pruned_vocab_loss_reference(
    hidden, weight, teacher_logits=None, mask=None, *, teacher_hidden=None, teacher_weight=None
):
    """The definition, materialising the [T, V] logits (and the teacher's) in fp32."""
    _check_args(hidden, weight, teacher_logits, mask, teacher_hidden, teacher_weight)
    teacher = _teacher_logits_of(teacher_logits, teacher_hidden, teacher_weight)
    logits = hidden.float() @ weight.float().t()
    logp = F.log_softmax(logits, dim=-1)
    p = F.softmax(teacher, dim=-1)
    per_token = -(p * logp).sum(-1)
    m = mask.to(per_token.dtype)
    loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    correct = logits.argmax(-1) == teacher.argmax(-1)
    return loss, correct


def pruned_vocab_loss(
    hidden,
    weight,
    teacher_logits=None,
    mask=None,
    *,
    teacher_hidden=None,
    teacher_weight=None,
    backend="auto",
    chunk_size=None,
    keep_bytes=None,
    mm_dtype=None,
):
    """hidden [T, H], weight [V, H], mask [T] bool, and the teacher as either teacher_logits
    [T, V] (may be strided) or teacher_hidden [T, H_t] (may be a strided view) with
    teacher_weight [V, H_t] (exactly one of the two forms; neither gets a grad).
    Returns (loss: 0-dim fp32 with grads to hidden and weight, correct: bool [T]).

    backend: "auto" (the chunked torch path, on every device; SPECFAST_KERNELS may name another),
    "triton", "torch" or "reference".
    chunk_size: rows per chunk of the torch path (default: about 64 MiB of fp32 logits per chunk).
    keep_bytes: torch path only; how many bytes of fp32 grad_logits the forward may keep for the
    backward instead of recomputing them (default: KEEP_BYTES, 128 MiB; 0 recomputes every chunk
    and keeps nothing of size T·V). The Triton path always recomputes (see the module docstring).
    mm_dtype: torch path only; the dtype of the draft's matmuls (bf16 runs ~2.3x faster than fp32
    on CPUs with AVX-512 BF16); softmaxes, sums and gradients stay fp32. Default: the autocast
    dtype where autocast is on for the inputs' device, else a 16-bit hidden's own dtype on CUDA,
    else fp32. A teacher given as 16-bit hidden state on CUDA is multiplied in exact TF32.
    """
    T, H, V = _check_args(hidden, weight, teacher_logits, mask, teacher_hidden, teacher_weight)

    backend = env_backend(backend)
    if backend == "auto":
        # The chunked torch path everywhere: on CUDA its matmuls are cuBLAS's, and on an H200 it
        # ran several times faster than the Triton kernel (module docstring), which stays
        # selectable as backend="triton".
        backend = "torch"
        log_once(
            f"pruned_vocab_loss:torch:{hidden.device.type}",
            f"pruned_vocab_loss: chunked torch path on {hidden.device.type}",
        )

    if backend == "reference":
        return pruned_vocab_loss_reference(
            hidden,
            weight,
            teacher_logits,
            mask,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
        )

    # One compute dtype for both operands; autograd casts the grads back to each input's dtype.
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    mask = mask.to(torch.bool)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()
    else:  # frozen: detached, so autograd neither saves nor differentiates them
        tdtype = torch.promote_types(teacher_hidden.dtype, teacher_weight.dtype)
        teacher_hidden = teacher_hidden.detach().to(tdtype)
        teacher_weight = teacher_weight.detach().to(tdtype)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package")
        if not (hidden.is_cuda or interpreting()):
            raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
        from .pruned_vocab_loss_triton import TritonPrunedVocabLoss

        return TritonPrunedVocabLoss.apply(
            hidden, weight, teacher_logits, teacher_hidden, teacher_weight, mask
        )
    if backend == "torch":
        keep = KEEP_BYTES if keep_bytes is None else int(keep_bytes)
        if keep < 0:
            raise ValueError(f"keep_bytes must be ≥ 0, not {keep_bytes}")
        if mm_dtype is None:
            mm_dtype = _default_mm_dtype(hidden)
        # The function picks its own dtypes: autocast inside it would round the fp32 sums.
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedPrunedVocabLoss.apply(
                hidden,
                weight,
                teacher_logits,
                teacher_hidden,
                teacher_weight,
                mask,
                chunk_size,
                keep,
                mm_dtype,
            )
    raise ValueError(f"unknown backend {backend!r}")


def _check_args(hidden, weight, teacher_logits, mask, teacher_hidden, teacher_weight):
    """Shapes, and exactly one teacher form. Returns (T, H, V)."""
    T, H = hidden.shape
    V = weight.shape[0]
    assert weight.shape == (V, H), (
        f"weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}"
    )
    if mask is None:
        raise TypeError("pruned_vocab_loss: mask [T] is required")
    from_hidden = teacher_hidden is not None or teacher_weight is not None
    if (teacher_logits is None) == (not from_hidden):
        raise ValueError(
            "pruned_vocab_loss: give the teacher either as teacher_logits or as teacher_hidden "
            "with teacher_weight, not both and not neither"
        )
    if teacher_logits is not None:
        assert teacher_logits.shape == (T, V), (
            f"teacher_logits {tuple(teacher_logits.shape)} != {(T, V)}"
        )
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(
                "pruned_vocab_loss: teacher_hidden and teacher_weight go together; got only "
                + ("teacher_hidden" if teacher_weight is None else "teacher_weight")
            )
        if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != T:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must be [T={T}, H_t]")
        if teacher_weight.shape != (V, teacher_hidden.shape[1]):
            raise ValueError(
                f"teacher_weight {tuple(teacher_weight.shape)} must be "
                f"[V={V}, H_t={teacher_hidden.shape[1]}]"
            )
    assert mask.shape == (T,), f"mask {tuple(mask.shape)} != {(T,)}"
    return T, H, V


def _loss_scale(grad_loss, mask):
    """d loss / d per_token for a supervised row: grad_out / max(1, Σ mask), as a 1-element fp32
    tensor (kept on the device: no host sync)."""
    n = mask.sum().clamp(min=1).to(torch.float32)
    return (grad_loss.to(torch.float32) / n).reshape(1)


# --------------------------------------------------------------------------------------------------
# Chunked PyTorch path
# --------------------------------------------------------------------------------------------------


def _is_16bit_cuda(t):
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def _default_mm_dtype(hidden):
    """The autocast dtype where autocast is on; else, on CUDA, a 16-bit hidden's own dtype (tensor
    cores, fp32 sums); else fp32 (the CPU training dtype)."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    if _is_16bit_cuda(hidden):
        return hidden.dtype
    return torch.float32


class _ExactTF32:
    """TF32 matmuls for operands that are 16-bit values held in fp32: TF32 keeps 10 mantissa bits,
    so bf16 and fp16 values pass unrounded and the products are those of fp32, on tensor cores."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        if self.on:
            self.before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.on:
            torch.backends.cuda.matmul.allow_tf32 = self.before


def _chunk_rows(T, V, chunk_size):
    if chunk_size is None:
        chunk_size = max(16, _CHUNK_BYTES // (4 * max(V, 1)))
    return max(1, min(int(chunk_size), max(T, 1)))


class _Teacher:
    """The teacher's rows, one chunk at a time: a view of the caller's logits, or fp32 logits
    formed from teacher_hidden (teacher_weight is cast to fp32 once per pass, not per chunk).
    The teacher stays fp32 whatever the draft's matmul dtype: it is one matmul per call, and the
    soft targets and argmax labels are where rounding would bias the loss."""

    def __init__(self, logits, hidden, weight):
        self.logits, self.hidden = logits, hidden
        self.weight_t = None if weight is None else weight.float().t()
        self.exact_tf32 = hidden is not None and _is_16bit_cuda(hidden)

    def rows(self, rows):
        if self.logits is not None:
            return self.logits[rows]
        with _ExactTF32(self.exact_tf32):
            return self.hidden[rows].float() @ self.weight_t


class _ChunkedPrunedVocabLoss(torch.autograd.Function):
    """Rows in chunks of C. Elementwise work goes through fused row-wise ops (max, softmax, a
    batched row dot) because at small H it costs as much as the matmul; log-sum-exps come out of
    the softmax: softmax(x)[argmax] = exp(max − lse), so lse = max − log softmax(x)[argmax].

    Chunks with a supervised row are kept while their fp32 grad_logits fit in what is left of
    keep_bytes; the kept blocks are saved for backward (so saved-tensor hooks see them). A
    recomputed chunk holds at most two [C, V] fp32 blocks at a time, a kept one three."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        mask,
        chunk_size,
        keep,
        mm_dtype,
    ):
        T, V = hidden.shape[0], weight.shape[0]
        C = _chunk_rows(T, V, chunk_size)
        w = weight.to(mm_dtype)  # once, not per chunk (a no-op in fp32, the CPU training dtype)
        teacher = _Teacher(teacher_logits, teacher_hidden, teacher_weight)
        per_token = torch.empty(T, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(T, dtype=torch.bool, device=hidden.device)
        budget, kept, kept_starts = keep, [], []
        recompute = False  # does some supervised chunk need its logits again in the backward?
        for t0 in range(0, T, C):
            rows = slice(t0, min(T, t0 + C))
            # the teacher first, so that its fp32 block (from teacher_hidden) is gone before the
            # draft's logits exist
            t = teacher.rows(rows)
            i_t = t.argmax(-1)
            p_t = torch.softmax(t, -1, dtype=torch.float32)
            del t
            z = (hidden[rows].to(mm_dtype) @ w.t()).float()
            m_d, i_d = z.max(-1)  # value and first index in one pass, on the raw logits
            correct[rows] = i_d == i_t
            expected_logit = torch.einsum("tv,tv->t", p_t, z)  # Σ_v softmax(teacher)_v · logit_v
            nbytes = z.numel() * 4
            supervised = bool(mask[rows].any())
            keep = supervised and nbytes <= budget
            recompute |= supervised and not keep
            if not keep:
                del p_t  # only two blocks alive on the recompute path
            p_d = torch.softmax(z, -1)
            del z
            lse_d = m_d - p_d.gather(1, i_d[:, None])[:, 0].log()
            per_token[rows] = lse_d - expected_logit
            if keep:  # grad_logits, unmasked and unscaled: the backward applies both to [C, H]
                kept.append(p_d.sub_(p_t))
                kept_starts.append(t0)
                budget -= nbytes
                del p_t
            del p_d
        m = mask.to(torch.float32)
        loss = torch.where(mask, per_token, 0.0).sum() / m.sum().clamp(min=1.0)
        if not recompute:  # then the backward needs no teacher: do not keep it alive
            teacher_logits = teacher_hidden = teacher_weight = None
        ctx.save_for_backward(
            hidden, weight, mask, teacher_logits, teacher_hidden, teacher_weight, *kept
        )
        ctx.chunk_rows = C
        ctx.mm_dtype = mm_dtype
        ctx.kept_starts = kept_starts
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        # The backward runs under the caller's autocast too; it picks its own dtypes.
        with torch.autocast(grad_loss.device.type, enabled=False):
            return _ChunkedPrunedVocabLoss._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        hidden, weight, mask, teacher_logits, teacher_hidden, teacher_weight, *kept = (
            ctx.saved_tensors
        )
        kept = dict(zip(ctx.kept_starts, kept))
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T = hidden.shape[0]
        C = ctx.chunk_rows
        scale = _loss_scale(grad_loss, mask)
        cd = ctx.mm_dtype
        w = weight.to(cd)
        teacher = None
        grad_h = (
            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        )
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        for t0 in range(0, T, C):
            rows = slice(t0, min(T, t0 + C))
            m = mask[rows]
            if t0 not in kept and not bool(m.any()):
                continue  # unsupervised rows contribute no gradient: skip their matmuls
            h = hidden[rows].to(cd)
            if t0 in kept:
                g = kept[t0]  # read only: a retained graph may run this backward again
            else:
                if teacher is None:
                    teacher = _Teacher(teacher_logits, teacher_hidden, teacher_weight)
                g = torch.softmax((h @ w.t()).float(), -1)
                g.sub_(torch.softmax(teacher.rows(rows), -1, dtype=torch.float32))
            # the mask scales rows: apply it to the [C, H] operands, not the [C, V] block
            m = m.to(torch.float32)[:, None]
            g = g.to(cd)  # a no-op in fp32; low-precision matmuls, fp32 sums otherwise
            if need_h:
                grad_h[rows] = (g @ w).float().mul_(m)
            if need_w and cd == torch.float32:
                grad_w.addmm_(g.t(), h * m)  # in place: no [V, H] temporary
            elif need_w:
                grad_w.add_(g.t() @ (h * m.to(cd)))
            del g, h
        if need_h:
            grad_h = grad_h.mul_(scale).to(hidden.dtype)
        if need_w:
            grad_w = grad_w.mul_(scale).to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None
