"""The Triton path of `pruned_vocab_loss` (see pruned_vocab_loss.py for the math and the API).

Forward: one program per (row block, V split) walks its V range tile by tile with an online
log-sum-exp, max and argmax for the draft and the teacher, plus Σ exp(teacher)·draft logit for the
soft-CE; the splits' partials are combined in torch. Backward: one program per [rows, V] tile
recomputes the draft logits (and the teacher's, when it comes as hidden state), forms
grad_logits = (softmax(draft) − softmax(teacher))·mask from the forward's per-row log-sum-exps and
adds its products into fp32 grad_hidden / grad_weight with atomics (the Cut Cross-Entropy layout).

A teacher given as hidden state costs one more `tl.dot` per tile, in the forward and again in the
backward, instead of reading a [T, V] teacher tensor; the per-row teacher log-sum-exp is kept
from the forward either way.
"""

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting
from .pruned_vocab_loss import _loss_scale


@triton.jit
def _row_tile(ptr, rows, rows_ok, stride, cols, cols_ok, UPCAST: tl.constexpr):
    """[len(rows), len(cols)] tile of a matrix with unit-stride columns; zeros out of range, fp32
    when UPCAST (the interpreter computes bf16 arithmetic wrongly)."""
    x = tl.load(
        ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :],
        mask=rows_ok[:, None] & cols_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        x = x.to(tl.float32)
    return x


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
    for k0 in range(0, H, BLOCK_H):
        kk = k0 + offs_k
        k_ok = kk < H
        h = _row_tile(h_ptr, offs_t, row_ok, stride_h, kk, k_ok, UPCAST)
        w = _row_tile(w_ptr, offs_v, col_ok, stride_w, kk, k_ok, UPCAST)
        acc += tl.dot(h, tl.trans(w), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _teacher_tile(
    t_ptr,
    tw_ptr,
    offs_t,
    offs_v,
    T,
    V,
    HT,
    stride_tt,
    stride_tv,
    stride_tw,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_HT: tl.constexpr,
    TEACHER_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    T_DOT_PRECISION: tl.constexpr,
):
    """fp32 [BLOCK_T, BLOCK_V] teacher logits: read from t_ptr (logits [T, V]), or formed as
    teacher_hidden (t_ptr, [T, HT]) · teacher_weight (tw_ptr, [V, HT])ᵀ when TEACHER_DOT.
    Out-of-range entries are 0."""
    if TEACHER_DOT:
        t = _logits_tile(
            t_ptr,
            tw_ptr,
            offs_t,
            offs_v,
            T,
            V,
            HT,
            stride_tt,
            stride_tw,
            BLOCK_T,
            BLOCK_V,
            BLOCK_HT,
            UPCAST,
            T_DOT_PRECISION,
        )
    else:
        t = tl.load(
            t_ptr
            + offs_t.to(tl.int64)[:, None] * stride_tt
            + offs_v.to(tl.int64)[None, :] * stride_tv,
            mask=(offs_t < T)[:, None] & (offs_v < V)[None, :],
            other=0.0,
        ).to(tl.float32)
    return t


@triton.jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    t_ptr,
    tw_ptr,
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
    HT,
    stride_h,
    stride_w,
    stride_tt,
    stride_tv,
    stride_tw,
    V_PER_SPLIT,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HT: tl.constexpr,
    TEACHER_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    T_DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_T rows × one V split. Writes per-(split, row) partials: draft max /
    Σexp / argmax, teacher max / Σexp / Σ exp(teacher)·logit / argmax. Partials are combined in
    torch."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = offs_t < T

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
        # the teacher's tile first: loaded before the draft's dot loop, it halves the register
        # spills of the logits-teacher forward on sm_90 (1.2 KB → 0.6 KB per thread)
        t = _teacher_tile(
            t_ptr,
            tw_ptr,
            offs_t,
            offs_v,
            T,
            v_end,
            HT,
            stride_tt,
            stride_tv,
            stride_tw,
            BLOCK_T,
            BLOCK_V,
            BLOCK_HT,
            TEACHER_DOT,
            UPCAST,
            T_DOT_PRECISION,
        )
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
    tw_ptr,
    lse_d_ptr,
    lse_t_ptr,
    mask_ptr,
    scale_ptr,
    gh_ptr,
    gw_ptr,
    T,
    V,
    H,
    HT,
    stride_h,
    stride_w,
    stride_tt,
    stride_tv,
    stride_tw,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HT: tl.constexpr,
    GROUP_T: tl.constexpr,
    TEACHER_DOT: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    T_DOT_PRECISION: tl.constexpr,
):
    """One program: one [BLOCK_T, BLOCK_V] tile. Recomputes the logits (the teacher's too when it
    comes as hidden state), forms g = (softmax(draft) − softmax(teacher))·mask, and atomically adds
    scale·g·W into grad_hidden and scale·gᵀ·h into grad_weight (both fp32 [·, H] buffers),
    BLOCK_H columns at a time."""
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

    # the teacher's probabilities first: its fp32 tile is dead before the draft's accumulates
    lse_t = tl.load(lse_t_ptr + offs_t, mask=row_ok, other=0.0)
    t = _teacher_tile(
        t_ptr,
        tw_ptr,
        offs_t,
        offs_v,
        T,
        V,
        HT,
        stride_tt,
        stride_tv,
        stride_tw,
        BLOCK_T,
        BLOCK_V,
        BLOCK_HT,
        TEACHER_DOT,
        UPCAST,
        T_DOT_PRECISION,
    )
    p_t = tl.exp(t - lse_t[:, None])
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
    lse_d = tl.load(lse_d_ptr + offs_t, mask=row_ok, other=0.0)
    g = (tl.exp(z - lse_d[:, None]) - p_t) * m[:, None]
    g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
    # the matmul operand dtype; |g| ≤ 1 so fp16 does not underflow
    g = g.to(h_ptr.dtype.element_ty)
    if UPCAST:
        g = g.to(tl.float32)
    scale = tl.load(scale_ptr)

    offs_k = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        kk = k0 + offs_k
        k_ok = kk < H
        if COMPUTE_DH:
            w = _row_tile(w_ptr, offs_v, col_ok, stride_w, kk, k_ok, UPCAST)
            dh = tl.dot(g, w, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(
                gh_ptr + offs_t.to(tl.int64)[:, None] * H + kk[None, :],
                dh,
                mask=row_ok[:, None] & k_ok[None, :],
            )
        if COMPUTE_DW:
            h = _row_tile(h_ptr, offs_t, row_ok, stride_h, kk, k_ok, UPCAST)
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
    else:  # under the interpreter: small enough to be quick, >1 so the combine is exercised
        target = 4
    return max(1, min(n_v_blocks, -(-target // n_t_blocks)))


def _teacher_args(teacher_logits, teacher_hidden, teacher_weight):
    """(t_ptr, tw_ptr, HT, stride_tt, stride_tv, stride_tw, TEACHER_DOT, its dtype) for the
    kernels. teacher_hidden may be a row-strided view; its columns must be unit-stride."""
    if teacher_logits is not None:
        t = teacher_logits
        return dict(
            t=t, tw=t, HT=0, stride_tt=t.stride(0), stride_tv=t.stride(1), stride_tw=0, dot=False
        ), t.dtype
    th = teacher_hidden if teacher_hidden.stride(1) == 1 else teacher_hidden.contiguous()
    tw = teacher_weight.contiguous()
    return dict(
        t=th,
        tw=tw,
        HT=th.shape[1],
        stride_tt=th.stride(0),
        stride_tv=1,
        stride_tw=tw.stride(0),
        dot=True,
    ), th.dtype


class TritonPrunedVocabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, teacher_hidden, teacher_weight, mask):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        cfg = _triton_config(dev, hidden.dtype)
        BT, BV, BH = cfg["fwd"]
        ta, tdtype = _teacher_args(teacher_logits, teacher_hidden, teacher_weight)
        BHT = _triton_config(dev, tdtype)["fwd"][2]  # the H step that fits the teacher's dtype
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
                ta["t"],
                ta["tw"],
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
                ta["HT"],
                hidden.stride(0),
                weight.stride(0),
                ta["stride_tt"],
                ta["stride_tv"],
                ta["stride_tw"],
                v_blocks_per_split * BV,
                BLOCK_T=BT,
                BLOCK_V=BV,
                BLOCK_H=BH,
                BLOCK_HT=BHT,
                TEACHER_DOT=ta["dot"],
                UPCAST=interpreting(),
                DOT_PRECISION=_dot_precision(hidden.dtype),
                T_DOT_PRECISION=_dot_precision(tdtype),
                num_warps=cfg["num_warps"],
                num_stages=cfg["fwd_stages"],
            )

        # Combine the V splits (tensors of [n_splits, T]: cheap). torch's max returns the first
        # split on ties: the lowest vocabulary index.
        M_d, first_d = m_d.max(0)
        M_t, first_t = m_t.max(0)
        lse_d = M_d + torch.log((s_d * torch.exp(m_d - M_d)).sum(0))
        S_t = (s_t * torch.exp(m_t - M_t)).sum(0)
        lse_t = M_t + torch.log(S_t)
        # Σ_v softmax(teacher)_v · logit_v
        expected_logit = (a_t * torch.exp(m_t - M_t)).sum(0) / S_t
        per_token = lse_d - expected_logit
        correct = i_d.gather(0, first_d[None])[0] == i_t.gather(0, first_t[None])[0]

        m = mask.to(torch.float32)
        loss = torch.where(mask, per_token, 0.0).sum() / m.sum().clamp(min=1.0)
        ctx.save_for_backward(hidden, weight, ta["t"], ta["tw"], mask, lse_d, lse_t)
        ctx.teacher = {k: v for k, v in ta.items() if k not in ("t", "tw")}
        ctx.teacher_dtype = tdtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        hidden, weight, t, tw, mask, lse_d, lse_t = ctx.saved_tensors
        ta = ctx.teacher
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T, H = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        cfg = _triton_config(dev, hidden.dtype)
        BT, BV, BH = cfg["bwd"]
        BHT = _triton_config(dev, ctx.teacher_dtype)["bwd"][2]
        grad_h = torch.zeros(T, H, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=dev) if need_w else None
        if (need_h or need_w) and T > 0:
            dummy = torch.empty(1, dtype=torch.float32, device=dev)
            _bwd_kernel[(triton.cdiv(T, BT) * triton.cdiv(V, BV),)](
                hidden,
                weight,
                t,
                tw,
                lse_d,
                lse_t,
                mask.to(torch.float32),
                _loss_scale(grad_loss, mask),
                grad_h if need_h else dummy,
                grad_w if need_w else dummy,
                T,
                V,
                H,
                ta["HT"],
                hidden.stride(0),
                weight.stride(0),
                ta["stride_tt"],
                ta["stride_tv"],
                ta["stride_tw"],
                BLOCK_T=BT,
                BLOCK_V=BV,
                BLOCK_H=BH,
                BLOCK_HT=BHT,
                GROUP_T=8,
                TEACHER_DOT=ta["dot"],
                COMPUTE_DH=need_h,
                COMPUTE_DW=need_w,
                UPCAST=interpreting(),
                DOT_PRECISION=_dot_precision(hidden.dtype),
                T_DOT_PRECISION=_dot_precision(ctx.teacher_dtype),
                num_warps=cfg["num_warps"],
                num_stages=cfg["bwd_stages"],
            )
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            None,
            None,
            None,
            None,
        )
