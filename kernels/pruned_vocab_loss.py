"""Pruned-vocabulary head + soft cross-entropy: the draft's lm_head over V_draft tokens against the
target's distribution restricted to the same tokens.

    loss    = Σ_t mask_t · ( −Σ_v softmax(teacher_t)_v · log_softmax(hidden_t · weightᵀ)_v )
              / max(1, Σ_t mask_t)
    correct = argmax_v(hidden_t · weightᵀ) == argmax_v(teacher_t)      (ties → lowest index)

Three implementations of the same math:
  - `pruned_vocab_loss_reference`: the definition; materialises fp32 logits [T, V].
  - Triton (CUDA, or anywhere under TRITON_INTERPRET=1): the forward walks V tile by tile with an
    online log-sum-exp for draft and teacher, the soft-CE and both argmaxes; the backward recomputes
    each logits tile, forms grad_logits = (softmax(draft) − softmax(teacher))·mask, and adds its
    products into grad_hidden / grad_weight with fp32 atomics (the Cut Cross-Entropy layout).
  - chunked PyTorch (CPU and any other device): the same recompute-in-backward scheme over chunks
    of rows, so at most two [chunk, V] fp32 blocks exist at a time and peak memory is flat in T.

Neither fast path keeps anything of size T·V for backward (Triton keeps the per-row log-sum-exps;
the torch path recomputes them with the softmax).
The backward folds the loss scale grad_out/N in after the matmuls, so fp16 grad tiles (values in
[−1, 1]) do not underflow when N is large.
"""

import torch
import torch.nn.functional as F

from ._dispatch import interpreting, log_once, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # CPU-only installs without the `triton` extra still get the torch paths
    triton = None


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


def pruned_vocab_loss(hidden, weight, teacher_logits, mask, *, backend="auto", chunk_size=None):
    """hidden [T, H], weight [V, H], teacher_logits [T, V] (may be strided), mask [T] bool.
    Returns (loss: 0-dim fp32 with grads to hidden and weight, correct: bool [T]).

    backend: "auto" (CUDA → Triton, otherwise chunked torch), "triton", "torch" or "reference".
    chunk_size: rows per chunk of the torch path (default: about 64 MiB of fp32 logits per chunk).
    """
    T, H = hidden.shape
    V = weight.shape[0]
    assert weight.shape == (V, H), (
        f"weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}"
    )
    assert teacher_logits.shape == (T, V), (
        f"teacher_logits {tuple(teacher_logits.shape)} != {(T, V)}"
    )
    assert mask.shape == (T,), f"mask {tuple(mask.shape)} != {(T,)}"

    if backend == "auto":
        if hidden.is_cuda and triton is not None:
            backend = "triton"
            log_once("pruned_vocab_loss:triton", "pruned_vocab_loss: Triton kernel on CUDA")
        elif hidden.is_cuda:
            backend = "torch"
            log_once(
                "pruned_vocab_loss:no-triton",
                "pruned_vocab_loss: Triton not installed; chunked torch on CUDA",
            )
        else:
            backend = "torch"
            log_once(
                "pruned_vocab_loss:torch",
                f"pruned_vocab_loss: chunked torch path on {hidden.device.type}",
            )

    if backend == "reference":
        return pruned_vocab_loss_reference(hidden, weight, teacher_logits, mask)

    # One compute dtype for both operands; autograd casts the grads back to each input's dtype.
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    mask = mask.to(torch.bool)
    teacher_logits = teacher_logits.detach()
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the triton package")
        if not (hidden.is_cuda or interpreting()):
            raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1")
        return _TritonPrunedVocabLoss.apply(hidden, weight, teacher_logits, mask)
    if backend == "torch":
        return _ChunkedPrunedVocabLoss.apply(hidden, weight, teacher_logits, mask, chunk_size)
    raise ValueError(f"unknown backend {backend!r}")


def _loss_scale(grad_loss, mask):
    """d loss / d per_token for a supervised row: grad_out / max(1, Σ mask), as a 1-element fp32
    tensor (kept on the device: no host sync)."""
    n = mask.sum().clamp(min=1).to(torch.float32)
    return (grad_loss.to(torch.float32) / n).reshape(1)


# --------------------------------------------------------------------------------------------------
# Chunked PyTorch path
# --------------------------------------------------------------------------------------------------

_CHUNK_BYTES = (
    64 << 20
)  # fp32 logits per chunk (two such blocks alive); fewer rows slow the CPU GEMMs


def _chunk_rows(T, V, chunk_size):
    if chunk_size is None:
        chunk_size = max(16, _CHUNK_BYTES // (4 * max(V, 1)))
    return max(1, min(int(chunk_size), max(T, 1)))


class _ChunkedPrunedVocabLoss(torch.autograd.Function):
    """Rows in chunks of C: at most two fp32 [C, V] blocks alive at a time, in forward and backward.
    Elementwise work goes through fused row-wise ops (max, softmax, a batched row dot) because at
    small H it costs as much as the matmul; log-sum-exps come out of the softmax:
    softmax(x)[argmax] = exp(max − lse), so lse = max − log softmax(x)[argmax]."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher, mask, chunk_size):
        T, V = teacher.shape
        C = _chunk_rows(T, V, chunk_size)
        w = weight.float()  # once, not per chunk (a no-op in fp32, the CPU training dtype)
        per_token = torch.empty(T, dtype=torch.float32, device=hidden.device)
        correct = torch.empty(T, dtype=torch.bool, device=hidden.device)
        for t0 in range(0, T, C):
            rows = slice(t0, min(T, t0 + C))
            z = hidden[rows].float() @ w.t()
            t = teacher[rows]
            m_d, i_d = z.max(-1)  # value and first index in one pass, on the raw logits
            i_t = t.argmax(-1)
            correct[rows] = i_d == i_t
            p_t = torch.softmax(t, -1, dtype=torch.float32)
            expected_logit = torch.einsum("tv,tv->t", p_t, z)  # Σ_v softmax(teacher)_v · logit_v
            del p_t
            p_d = torch.softmax(z, -1)
            lse_d = m_d - p_d.gather(1, i_d[:, None])[:, 0].log()
            per_token[rows] = lse_d - expected_logit
            del z, p_d
        m = mask.to(torch.float32)
        loss = torch.where(mask, per_token, 0.0).sum() / m.sum().clamp(min=1.0)
        ctx.save_for_backward(hidden, weight, teacher, mask)
        ctx.chunk_rows = C
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        hidden, weight, teacher, mask = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T = hidden.shape[0]
        C = ctx.chunk_rows
        scale = _loss_scale(grad_loss, mask)
        w = weight.float()
        grad_h = (
            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        )
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        for t0 in range(0, T, C):
            rows = slice(t0, min(T, t0 + C))
            m = mask[rows]
            if not bool(m.any()):
                continue  # unsupervised rows contribute no gradient: skip their matmuls
            h = hidden[rows].float()
            g = torch.softmax(h @ w.t(), -1)
            g.sub_(torch.softmax(teacher[rows], -1, dtype=torch.float32))
            # the mask scales rows: apply it to the [C, H] operands, not the [C, V] block
            m = m.to(torch.float32)[:, None]
            if need_h:
                grad_h[rows] = (g @ w).mul_(m)
            if need_w:
                grad_w.addmm_(g.t(), h * m)
            del g, h
        if need_h:
            grad_h = grad_h.mul_(scale).to(hidden.dtype)
        if need_w:
            grad_w = grad_w.mul_(scale).to(weight.dtype)
        return grad_h, grad_w, None, None, None


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _logits_tile(
        h_ptr,
        w_ptr,
        offs_t,
        offs_v,
        T,
        V,
        H,
        stride_h,
        stride_w,
        BLOCK_T: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """fp32 [BLOCK_T, BLOCK_V] tile of hidden · weightᵀ, reducing over H in BLOCK_H steps.
        Out-of-range rows/columns read zeros."""
        acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_H)
        row_ok = offs_t < T
        col_ok = offs_v < V
        h_rows = h_ptr + offs_t.to(tl.int64)[:, None] * stride_h
        w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w
        for k0 in range(0, H, BLOCK_H):
            kk = k0 + offs_k
            k_ok = kk < H
            h = tl.load(h_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter computes bf16 arithmetic wrongly
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(h, tl.trans(w), input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _fwd_kernel(
        h_ptr,
        w_ptr,
        t_ptr,
        m_d_ptr,
        s_d_ptr,
        i_d_ptr,
        m_t_ptr,
        s_t_ptr,
        a_t_ptr,
        i_t_ptr,
        T,
        V,
        H,
        stride_h,
        stride_w,
        stride_tt,
        stride_tv,
        V_PER_SPLIT,
        BLOCK_T: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """One program: BLOCK_T rows × one V split. Writes per-(split, row) partials: draft max /
        Σexp / argmax, teacher max / Σexp / Σ exp(teacher)·logit / argmax. Partials are combined in
        torch."""
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = offs_t < T
        t_rows = t_ptr + offs_t.to(tl.int64)[:, None] * stride_tt

        m_d = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        s_d = tl.zeros((BLOCK_T,), tl.float32)
        i_d = tl.zeros((BLOCK_T,), tl.int32)
        m_t = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        s_t = tl.zeros((BLOCK_T,), tl.float32)
        a_t = tl.zeros((BLOCK_T,), tl.float32)
        i_t = tl.zeros((BLOCK_T,), tl.int32)

        v_begin = pid_s * V_PER_SPLIT
        v_end = tl.minimum(V, v_begin + V_PER_SPLIT)
        for v0 in range(v_begin, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            col_ok = offs_v < v_end
            z = _logits_tile(
                h_ptr,
                w_ptr,
                offs_t,
                offs_v,
                T,
                v_end,
                H,
                stride_h,
                stride_w,
                BLOCK_T,
                BLOCK_V,
                BLOCK_H,
                UPCAST,
                DOT_PRECISION,
            )
            t = tl.load(
                t_rows + offs_v.to(tl.int64)[None, :] * stride_tv,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            z_live = tl.where(col_ok[None, :], z, float("-inf"))
            t_live = tl.where(col_ok[None, :], t, float("-inf"))

            # draft: running max, Σexp and argmax (an equal max in a later tile keeps the earlier
            # index)
            tile_m_d = tl.max(z_live, axis=1)
            tile_i_d = tl.argmax(z_live, axis=1, tie_break_left=True) + v0
            i_d = tl.where(tile_m_d > m_d, tile_i_d, i_d)
            new_m_d = tl.maximum(m_d, tile_m_d)
            s_d = s_d * tl.exp(m_d - new_m_d) + tl.sum(tl.exp(z_live - new_m_d[:, None]), axis=1)
            m_d = new_m_d

            # teacher: the same, plus Σ exp(teacher − max) · draft logit for the soft-CE
            tile_m_t = tl.max(t_live, axis=1)
            tile_i_t = tl.argmax(t_live, axis=1, tie_break_left=True) + v0
            i_t = tl.where(tile_m_t > m_t, tile_i_t, i_t)
            new_m_t = tl.maximum(m_t, tile_m_t)
            # a teacher may mask tokens with −inf: while a row has seen nothing finite, shift by 0
            # instead of −inf so that exp(−inf − (−inf)) cannot make a NaN
            shift_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
            alpha = tl.exp(m_t - shift_t)
            e_t = tl.exp(t_live - shift_t[:, None])
            s_t = s_t * alpha + tl.sum(e_t, axis=1)
            a_t = a_t * alpha + tl.sum(e_t * tl.where(col_ok[None, :], z, 0.0), axis=1)
            m_t = new_m_t

        out = pid_s * T + offs_t
        tl.store(m_d_ptr + out, m_d, mask=row_ok)
        tl.store(s_d_ptr + out, s_d, mask=row_ok)
        tl.store(i_d_ptr + out, i_d, mask=row_ok)
        tl.store(m_t_ptr + out, m_t, mask=row_ok)
        tl.store(s_t_ptr + out, s_t, mask=row_ok)
        tl.store(a_t_ptr + out, a_t, mask=row_ok)
        tl.store(i_t_ptr + out, i_t, mask=row_ok)

    @triton.jit
    def _bwd_kernel(
        h_ptr,
        w_ptr,
        t_ptr,
        lse_d_ptr,
        lse_t_ptr,
        mask_ptr,
        scale_ptr,
        gh_ptr,
        gw_ptr,
        T,
        V,
        H,
        stride_h,
        stride_w,
        stride_tt,
        stride_tv,
        BLOCK_T: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        GROUP_T: tl.constexpr,
        COMPUTE_DH: tl.constexpr,
        COMPUTE_DW: tl.constexpr,
        UPCAST: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """One program: one [BLOCK_T, BLOCK_V] tile. Recomputes the logits, forms
        g = (softmax(draft) − softmax(teacher))·mask, and atomically adds scale·g·W into grad_hidden
        and scale·gᵀ·h into grad_weight (both fp32 [·, H] buffers), BLOCK_H columns at a time."""
        # Grouped order: GROUP_T row blocks sweep V together, so their hidden rows and the current
        # weight rows stay in L2.
        pid = tl.program_id(0)
        n_t = tl.cdiv(T, BLOCK_T)
        n_v = tl.cdiv(V, BLOCK_V)
        per_group = GROUP_T * n_v
        first_t = (pid // per_group) * GROUP_T
        group_rows = tl.minimum(n_t - first_t, GROUP_T)
        pid_t = first_t + (pid % per_group) % group_rows
        pid_v = (pid % per_group) // group_rows

        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = offs_t < T
        col_ok = offs_v < V
        m = tl.load(mask_ptr + offs_t, mask=row_ok, other=0.0)
        if tl.max(m, axis=0) == 0.0:
            return  # no supervised row in this tile: its gradient is zero

        z = _logits_tile(
            h_ptr,
            w_ptr,
            offs_t,
            offs_v,
            T,
            V,
            H,
            stride_h,
            stride_w,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
            UPCAST,
            DOT_PRECISION,
        )
        t = tl.load(
            t_ptr
            + offs_t.to(tl.int64)[:, None] * stride_tt
            + offs_v.to(tl.int64)[None, :] * stride_tv,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        lse_d = tl.load(lse_d_ptr + offs_t, mask=row_ok, other=0.0)
        lse_t = tl.load(lse_t_ptr + offs_t, mask=row_ok, other=0.0)
        g = (tl.exp(z - lse_d[:, None]) - tl.exp(t - lse_t[:, None])) * m[:, None]
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        g = g.to(
            h_ptr.dtype.element_ty
        )  # the matmul operand dtype; |g| ≤ 1 so fp16 does not underflow
        if UPCAST:
            g = g.to(tl.float32)
        scale = tl.load(scale_ptr)

        offs_k = tl.arange(0, BLOCK_H)
        for k0 in range(0, H, BLOCK_H):
            kk = k0 + offs_k
            k_ok = kk < H
            if COMPUTE_DH:
                w = tl.load(
                    w_ptr + offs_v.to(tl.int64)[:, None] * stride_w + kk[None, :],
                    mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(g, w, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(
                    gh_ptr + offs_t.to(tl.int64)[:, None] * H + kk[None, :],
                    dh,
                    mask=row_ok[:, None] & k_ok[None, :],
                )
            if COMPUTE_DW:
                h = tl.load(
                    h_ptr + offs_t.to(tl.int64)[:, None] * stride_h + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(g), h, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(
                    gw_ptr + offs_v.to(tl.int64)[:, None] * H + kk[None, :],
                    dw,
                    mask=col_ok[:, None] & k_ok[None, :],
                )


def _triton_config(device, dtype):
    """Block sizes: small under the interpreter (each tl.dot costs milliseconds there, and small
    blocks exercise the edge masks), matmul-sized on a GPU. The GPU sizes were chosen by compiling
    for sm_90 and sm_80 with ptxas -v (no spills or a few hundred bytes, shared memory within the
    A100's 164 KiB); fp32 halves BLOCK_H (and the backward's BLOCK_T) to stay within it."""
    if device.type != "cuda":
        return dict(fwd=(16, 32, 32), bwd=(16, 32, 32), num_warps=4, fwd_stages=1, bwd_stages=1)
    if dtype == torch.float32:
        return dict(fwd=(64, 128, 32), bwd=(64, 128, 32), num_warps=8, fwd_stages=3, bwd_stages=2)
    return dict(fwd=(64, 128, 64), bwd=(128, 128, 64), num_warps=8, fwd_stages=3, bwd_stages=2)


def _dot_precision(dtype):
    # fp32 inputs follow torch's matmul setting (TF32 only when the user allowed it)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _num_splits(device, n_t_blocks, n_v_blocks):
    """How many programs share one row block's V range in the forward, so small T still fills the
    GPU."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = (
            4  # under the interpreter: small enough to be quick, >1 so the combine is exercised
        )
    return max(1, min(n_v_blocks, -(-target // n_t_blocks)))


class _TritonPrunedVocabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, mask):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        cfg = _triton_config(dev, hidden.dtype)
        BT, BV, BH = cfg["fwd"]
        n_t, n_v = triton.cdiv(T, BT), triton.cdiv(V, BV)
        v_blocks_per_split = triton.cdiv(n_v, _num_splits(dev, n_t, n_v))
        n_s = triton.cdiv(n_v, v_blocks_per_split)

        f32 = dict(dtype=torch.float32, device=dev)
        m_d, s_d, m_t, s_t, a_t = (torch.empty(n_s, T, **f32) for _ in range(5))
        i_d, i_t = (torch.empty(n_s, T, dtype=torch.int32, device=dev) for _ in range(2))
        if T > 0:
            _fwd_kernel[(n_t, n_s)](
                hidden,
                weight,
                teacher,
                m_d,
                s_d,
                i_d,
                m_t,
                s_t,
                a_t,
                i_t,
                T,
                V,
                H,
                hidden.stride(0),
                weight.stride(0),
                teacher.stride(0),
                teacher.stride(1),
                v_blocks_per_split * BV,
                BLOCK_T=BT,
                BLOCK_V=BV,
                BLOCK_H=BH,
                UPCAST=interpreting(),
                DOT_PRECISION=_dot_precision(hidden.dtype),
                num_warps=cfg["num_warps"],
                num_stages=cfg["fwd_stages"],
            )

        # Combine the V splits (tensors of [n_splits, T]: cheap).
        M_d, first_d = m_d.max(
            0
        )  # torch returns the first split on ties: the lowest vocabulary index
        M_t, first_t = m_t.max(0)
        lse_d = M_d + torch.log((s_d * torch.exp(m_d - M_d)).sum(0))
        S_t = (s_t * torch.exp(m_t - M_t)).sum(0)
        lse_t = M_t + torch.log(S_t)
        expected_logit = (a_t * torch.exp(m_t - M_t)).sum(
            0
        ) / S_t  # Σ_v softmax(teacher)_v · logit_v
        per_token = lse_d - expected_logit
        correct = i_d.gather(0, first_d[None])[0] == i_t.gather(0, first_t[None])[0]

        m = mask.to(torch.float32)
        loss = torch.where(mask, per_token, 0.0).sum() / m.sum().clamp(min=1.0)
        ctx.save_for_backward(hidden, weight, teacher, mask, lse_d, lse_t)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        hidden, weight, teacher, mask, lse_d, lse_t = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        cfg = _triton_config(dev, hidden.dtype)
        BT, BV, BH = cfg["bwd"]
        grad_h = torch.zeros(T, H, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_w else None
        if (need_h or need_w) and T > 0:
            dummy = torch.empty(1, dtype=torch.float32, device=dev)
            _bwd_kernel[(triton.cdiv(T, BT) * triton.cdiv(V, BV),)](
                hidden,
                weight,
                teacher,
                lse_d,
                lse_t,
                mask.to(torch.float32),
                _loss_scale(grad_loss, mask),
                grad_h if need_h else dummy,
                grad_w if need_w else dummy,
                T,
                V,
                H,
                hidden.stride(0),
                weight.stride(0),
                teacher.stride(0),
                teacher.stride(1),
                BLOCK_T=BT,
                BLOCK_V=BV,
                BLOCK_H=BH,
                GROUP_T=8,
                COMPUTE_DH=need_h,
                COMPUTE_DW=need_w,
                UPCAST=interpreting(),
                DOT_PRECISION=_dot_precision(hidden.dtype),
                num_warps=cfg["num_warps"],
                num_stages=cfg["bwd_stages"],
            )
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            None,
            None,
        )
