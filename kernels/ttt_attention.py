"""Training-time-test attention: step k's queries see the step-0 keys causally (within their own
document) and the keys of steps 1..k on the diagonal (same position only).

    out[b, h, i] = softmax over {keys[0][b, h', j] : j ≤ i, same doc}
                              ∪ {keys[s][b, h', i] : 1 ≤ s < S}
                   of q·k·scale, applied to the matching values;  h' = h // (Hq / Hkv)

Three implementations of the same math:
- `ttt_attention_reference`: dense [L, S·L] mask, the definition (test oracle only: O(S·L²) memory).
- Triton (CUDA, or anywhere under TRITON_INTERPRET=1): a flash-attention forward that runs the
  online softmax over the causal tiles of step 0 (tiles outside the causal / document range are
  never visited), then folds in the S−1 diagonal terms as row-local dot products, and stores the
  merged log-sum-exp. The backward recomputes probabilities from that merged LSE: one kernel per
  query block for dq (causal tiles + diagonals), one per key block for dk0/dv0 (causal tiles,
  looping over the GQA group so no atomics are needed) and dk_s/dv_s for s ≥ 1 (row-local).
- torch (CPU): PyTorch's CPU flash kernel for the causal part, one call per document, which returns
  its log-sum-exp; merged with the diagonal terms through that LSE. The backward calls the flash
  backward with the *merged* output and LSE, which yields exactly the causal part's share of the
  gradients; the diagonal gradients are row-local einsums. No L×L tensor is held at any point. (A
  block-diagonal `attn_mask` would push that kernel onto its masked path, which visits every tile:
  measured 6-7× slower than per-document calls for 8 documents at L=4096; see
  bench/results/ttt_attention-cpu-2core.md.)

Documents: `doc_ids[b]` must number each document as one contiguous run (the trainer numbers them
0, 1, 2, … along the row). Tile skipping relies on it, so it is checked on every call that passes
doc_ids (one small reduction and one host sync) and a violation raises ValueError.

Keys and values are kept for the backward by reference, not through `save_for_backward`: a caller
that writes later steps into other slices of one preallocated buffer bumps the buffer's shared
version counter, which would trip autograd's in-place check although the slices read here never
change (the dense reference has no such limit, so neither may we). The caller must not overwrite
keys[0:S] / values[0:S] before the backward has run.
"""

import functools

import torch

from ._dispatch import env_backend, interpreting, log_once, triton_available

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
except (
    ImportError
):  # specfast.kernels must import on machines without Triton; the torch path remains
    triton = None

_LOG2E = 1.4426950408889634


def ttt_attention_reference(q, keys, values, doc_ids=None, scale=None):
    """The definition: scores against all S·L keys under a dense [L, S·L] boolean mask."""
    S, B, Hkv, L, D = keys.shape
    Hq = q.shape[1]
    assert Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}"
    scale = D**-0.5 if scale is None else scale
    g = Hq // Hkv
    k = keys.float().repeat_interleave(g, dim=2).permute(1, 2, 0, 3, 4).reshape(B, Hq, S * L, D)
    v = values.float().repeat_interleave(g, dim=2).permute(1, 2, 0, 3, 4).reshape(B, Hq, S * L, D)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, L, S·L]

    i = torch.arange(L, device=q.device)
    causal = i[:, None] >= i[None, :]  # [L, L] for step 0
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, L, L]
        causal = causal[None] & same_doc
    else:
        causal = causal[None].expand(B, L, L)
    diag = torch.eye(L, dtype=torch.bool, device=q.device)[None].expand(B, L, L)
    mask = torch.cat([causal] + [diag] * (S - 1), dim=-1)  # [B, L, S·L]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)


def _doc_runs(doc_ids):
    """Per position: the first index of its document (`start`) and one past its last (`end`), int32
    [B, L]; plus the boolean [B, L] marking run starts. Raises if a document id recurs after a
    gap."""
    B, L = doc_ids.shape
    idx = torch.arange(L, device=doc_ids.device)
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cat([torch.ones_like(doc_ids[:, :1], dtype=torch.bool), change], dim=1)
    last = torch.cat([change, torch.ones_like(doc_ids[:, :1], dtype=torch.bool)], dim=1)
    start = torch.where(first, idx, 0).cummax(dim=1).values
    end = torch.where(last, idx + 1, L).flip(1).cummin(dim=1).values.flip(1)
    # contiguous ⇔ number of runs == number of distinct ids, per row
    srt = doc_ids.sort(dim=1).values
    distinct = 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)
    if not torch.equal(first.sum(dim=1), distinct):
        raise ValueError("ttt_attention: each document in a doc_ids row must be one contiguous run")
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous(), first


def _check(q, keys, values, doc_ids):
    assert keys.dim() == 5 and values.shape == keys.shape, "keys, values: [S, B, Hkv, L, D]"
    S, B, Hkv, L, D = keys.shape
    assert q.shape[0] == B and q.shape[2:] == (L, D), (
        f"q {tuple(q.shape)} vs keys {tuple(keys.shape)}"
    )
    assert q.shape[1] % Hkv == 0, f"Hq={q.shape[1]} is not a multiple of Hkv={Hkv}"
    assert S >= 1
    if doc_ids is not None:
        assert doc_ids.shape == (B, L), f"doc_ids {tuple(doc_ids.shape)}, expected {(B, L)}"


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _program_block(H, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's block of rows of one head: (block index along grid axis 0, batch, head
        among H (both int64, for offsets), the block's row indices and their mask (< L), the
        head-dim offsets and their mask (< D))."""
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        return pid, b, h, idx, idx < L, offs_d, offs_d < D

    @triton.jit
    def _load_tile(base, idx, s_l, offs_d, s_d, L, D, UPCAST: tl.constexpr):
        """Rows idx, columns offs_d of the [L, D] matrix at base with strides (s_l, s_d), zero
        outside it; in fp32 if UPCAST."""
        x = tl.load(
            base + idx[:, None] * s_l + offs_d[None, :] * s_d,
            mask=(idx < L)[:, None] & (offs_d < D)[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter gets low-precision arithmetic wrong
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _doc_starts(Start, b, L, rows, HAS_DOCS: tl.constexpr):
        """The first index of each query row's document (0 without documents)."""
        if HAS_DOCS:
            row_start = tl.load(Start + b * L + rows, mask=rows < L, other=0)
        else:
            row_start = tl.zeros(rows.shape, dtype=tl.int32)
        return row_start

    @triton.jit
    def _visible_keys(
        Start,
        b,
        L,
        pid_m,
        rows,
        HAS_DOCS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """For query block pid_m: each row's document start, and the step-0 keys [lo, hi) the block
        can see, lo rounded down to a key tile (starts are non-decreasing, so the first row's is
        the least)."""
        row_start = _doc_starts(Start, b, L, rows, HAS_DOCS)
        if HAS_DOCS:
            lo = (tl.load(Start + b * L + pid_m * BLOCK_M) // BLOCK_N) * BLOCK_N
        else:
            lo = 0
        return row_start, lo, tl.minimum((pid_m + 1) * BLOCK_M, L)

    @triton.jit
    def _causal_scores(
        q, k, rows, cols, row_start, L, scale_log2, DOT_PREC: tl.constexpr, KEYS_FIRST: tl.constexpr
    ):
        """Step-0 scores of query rows against key cols, q·kᵀ·scale_log2 (base 2), and where they
        count: the key at or before the query, in its document (row_start on), and the index along
        dim 1 (the one reduced over) below L. The tile is [rows, cols], or [cols, rows] if
        KEYS_FIRST."""
        if KEYS_FIRST:
            s = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
            r, c, r0, ok = rows[None, :], cols[:, None], row_start[None, :], rows[None, :] < L
        else:
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            r, c, r0, ok = rows[:, None], cols[None, :], row_start[:, None], cols[None, :] < L
        return s * scale_log2, (c <= r) & (c >= r0) & ok

    # The kernel signatures keep one tensor's strides to a line (`fmt: skip`): the formatter would
    # put each of their ~40 parameters on a line of its own.
    @triton.jit
    def _ttt_fwd_kernel(
        Q, K, V, Out, Lse, Start,
        sq_b, sq_h, sq_l, sq_d,
        sk_s, sk_b, sk_h, sk_l, sk_d,
        sv_s, sv_b, sv_h, sv_l, sv_d,
        so_b, so_h, so_l, so_d,
        S, Hq, L, D, GROUP, scale_log2,
        HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m, b, h, rows, row_ok, offs_d, d_ok = _program_block(Hq, L, D, BLOCK_M, BLOCK_D)
        q = _load_tile(Q + b * sq_b + h * sq_h, rows, sq_l, offs_d, sq_d, L, D, UPCAST)
        hk = h // GROUP
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        row_start, lo, hi = _visible_keys(Start, b, L, pid_m, rows, HAS_DOCS, BLOCK_M, BLOCK_N)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        # A finite floor for the running max keeps fully masked tiles from producing inf - inf.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)

        # Step 0: causal tiles within the document range only.
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, cols, sk_l, offs_d, sk_d, L, D, UPCAST)
            v = _load_tile(v_base, cols, sv_l, offs_d, sv_d, L, D, UPCAST)
            s, valid = _causal_scores(q, k, rows, cols, row_start, L, scale_log2, DOT_PREC, False)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new

        # Steps 1..S-1: one key per row, a row-local dot product each.
        qf = q.to(tl.float32)
        for s_idx in range(1, S):
            ks = _load_tile(k_base + s_idx * sk_s, rows, sk_l, offs_d, sk_d, L, D, True)
            vs = _load_tile(v_base + s_idx * sv_s, rows, sv_l, offs_d, sv_d, L, D, True)
            sd = tl.sum(qf * ks, 1) * scale_log2
            m_new = tl.maximum(m_i, sd)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(sd - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * vs
            m_i = m_new

        acc = acc / l_i[:, None]
        tl.store(
            Out + b * so_b + h * so_h + rows[:, None] * so_l + offs_d[None, :] * so_d,
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
        tl.store(Lse + (b * Hq + h) * L + rows, m_i + tl.math.log2(l_i), mask=row_ok)  # base 2

    @triton.jit
    def _ttt_bwd_dq_kernel(
        Q, K, V, DO, DQ, Lse, Delta, Start,
        sq_b, sq_h, sq_l, sq_d,
        sk_s, sk_b, sk_h, sk_l, sk_d,
        sv_s, sv_b, sv_h, sv_l, sv_d,
        sdo_b, sdo_h, sdo_l, sdo_d,
        S, Hq, L, D, GROUP, scale, scale_log2,
        HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """dq for one query block of one head; DQ is contiguous [B, Hq, L, D]."""
        pid_m, b, h, rows, row_ok, offs_d, d_ok = _program_block(Hq, L, D, BLOCK_M, BLOCK_D)
        q = _load_tile(Q + b * sq_b + h * sq_h, rows, sq_l, offs_d, sq_d, L, D, UPCAST)
        do = _load_tile(DO + b * sdo_b + h * sdo_h, rows, sdo_l, offs_d, sdo_d, L, D, UPCAST)
        lse = tl.load(Lse + (b * Hq + h) * L + rows, mask=row_ok, other=0.0)
        delta = tl.load(Delta + (b * Hq + h) * L + rows, mask=row_ok, other=0.0)
        hk = h // GROUP
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        row_start, lo, hi = _visible_keys(Start, b, L, pid_m, rows, HAS_DOCS, BLOCK_M, BLOCK_N)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            k = _load_tile(k_base, cols, sk_l, offs_d, sk_d, L, D, UPCAST)
            v = _load_tile(v_base, cols, sv_l, offs_d, sv_d, L, D, UPCAST)
            s, valid = _causal_scores(q, k, rows, cols, row_start, L, scale_log2, DOT_PREC, False)
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

        qf = q.to(tl.float32)
        dof = do.to(tl.float32)
        for s_idx in range(1, S):
            ks = _load_tile(k_base + s_idx * sk_s, rows, sk_l, offs_d, sk_d, L, D, True)
            vs = _load_tile(v_base + s_idx * sv_s, rows, sv_l, offs_d, sv_d, L, D, True)
            p = tl.math.exp2(tl.sum(qf * ks, 1) * scale_log2 - lse)
            ds = p * (tl.sum(dof * vs, 1) - delta)
            dq += ds[:, None] * ks

        tl.store(
            DQ + ((b * Hq + h) * L + rows[:, None]) * D + offs_d[None, :],
            (dq * scale).to(DQ.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    @triton.jit
    def _ttt_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, Lse, Delta, Start, End,
        sq_b, sq_h, sq_l, sq_d,
        sk_s, sk_b, sk_h, sk_l, sk_d,
        sv_s, sv_b, sv_h, sv_l, sv_d,
        sdo_b, sdo_h, sdo_l, sdo_d,
        S, B, Hkv, L, D, GROUP, scale, scale_log2,
        HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """dk, dv of all S steps for one key block of one KV head, summed over its GQA group of
        query heads inside the program (no atomics). DK, DV are contiguous [S, B, Hkv, L, D]."""
        pid_n, b, hk, cols, col_ok, offs_d, d_ok = _program_block(Hkv, L, D, BLOCK_N, BLOCK_D)
        Hq = Hkv * GROUP
        offs_m = tl.arange(0, BLOCK_M)
        cd_mask = col_ok[:, None] & d_ok[None, :]
        k_base = K + b * sk_b + hk * sk_h
        v_base = V + b * sv_b + hk * sv_h
        k = _load_tile(k_base, cols, sk_l, offs_d, sk_d, L, D, UPCAST)
        v = _load_tile(v_base, cols, sv_l, offs_d, sv_d, L, D, UPCAST)

        # Queries that can see this key block: from its first key's row to the end of the document
        # of its last key (query tiles need not align with key tiles: loads are masked per row).
        lo = pid_n * BLOCK_N
        if HAS_DOCS:
            hi = tl.load(End + b * L + tl.minimum(pid_n * BLOCK_N + BLOCK_N, L) - 1)
        else:
            hi = L

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(GROUP):
            h = hk * GROUP + g
            for m0 in range(lo, hi, BLOCK_M):
                rows = m0 + offs_m
                row_ok = rows < L
                q = _load_tile(Q + b * sq_b + h * sq_h, rows, sq_l, offs_d, sq_d, L, D, UPCAST)
                do = _load_tile(
                    DO + b * sdo_b + h * sdo_h, rows, sdo_l, offs_d, sdo_d, L, D, UPCAST
                )
                lse = tl.load(Lse + (b * Hq + h) * L + rows, mask=row_ok, other=0.0)
                delta = tl.load(Delta + (b * Hq + h) * L + rows, mask=row_ok, other=0.0)
                row_start = _doc_starts(Start, b, L, rows, HAS_DOCS)
                # transposed tile: keys along dim 0, queries along dim 1
                sT, valid = _causal_scores(
                    q, k, rows, cols, row_start, L, scale_log2, DOT_PREC, True
                )
                pT = tl.where(valid, tl.math.exp2(sT - lse[None, :]), 0.0)
                dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
                dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)

        out_base = (b * Hkv + hk) * L * D + cols[:, None] * D + offs_d[None, :]
        tl.store(DK + out_base, (dk * scale).to(DK.dtype.element_ty), mask=cd_mask)
        tl.store(DV + out_base, dv.to(DV.dtype.element_ty), mask=cd_mask)

        # Steps 1..S-1: key i of step s is seen by query i only, so these rows are the query rows.
        step = B * Hkv * L * D
        for s_idx in range(1, S):
            ks = _load_tile(k_base + s_idx * sk_s, cols, sk_l, offs_d, sk_d, L, D, True)
            vs = _load_tile(v_base + s_idx * sv_s, cols, sv_l, offs_d, sv_d, L, D, True)
            dks = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dvs = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for g in range(GROUP):
                h = hk * GROUP + g
                q = _load_tile(Q + b * sq_b + h * sq_h, cols, sq_l, offs_d, sq_d, L, D, True)
                do = _load_tile(DO + b * sdo_b + h * sdo_h, cols, sdo_l, offs_d, sdo_d, L, D, True)
                lse = tl.load(Lse + (b * Hq + h) * L + cols, mask=col_ok, other=0.0)
                delta = tl.load(Delta + (b * Hq + h) * L + cols, mask=col_ok, other=0.0)
                p = tl.math.exp2(tl.sum(q * ks, 1) * scale_log2 - lse)
                dvs += p[:, None] * do
                dks += (p * (tl.sum(do * vs, 1) - delta))[:, None] * q
            tl.store(
                DK + s_idx * step + out_base, (dks * scale).to(DK.dtype.element_ty), mask=cd_mask
            )
            tl.store(DV + s_idx * step + out_base, dvs.to(DV.dtype.element_ty), mask=cd_mask)


# Tiles per kernel: (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages). Chosen by
# compiling for sm_90 with Triton 3.9's ptxas and reading register use (the slow test in
# tests/test_ttt_attention.py repeats it): the 16-bit entries spill at most 16 bytes and fit 99 KiB
# of shared memory; fp32 operands (exact "ieee" dots run on FMA units, not tensor cores) need small
# tiles to avoid heavy spilling. Not yet timed on a GPU.
_TILES_16BIT = {
    64: {"fwd": (128, 64, 8, 3), "dq": (64, 64, 8, 3), "dkdv": (64, 64, 8, 3)},
    128: {"fwd": (128, 64, 8, 2), "dq": (64, 64, 8, 2), "dkdv": (64, 32, 8, 2)},
}
_TILES_FP32 = {
    64: {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
    128: {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2)},
}
# Head dims above 128, and the retry when a GPU lacks shared memory for the tables above.
_TILES_SMALL = {"16bit": (32, 32, 8, 1), "fp32": (16, 16, 8, 1)}
# Under the interpreter every program runs in Python: small tiles keep tests fast and multi-tile,
# and unequal BLOCK_M / BLOCK_N both ways exercise the tile-range arithmetic as the GPU tables do.
_TILES_INTERPRET = {"fwd": (32, 16, 1, 1), "dq": (16, 32, 1, 1), "dkdv": (32, 16, 1, 1)}
_use_small = False


def _tiles(kind, dtype, D, interpret):
    if interpret:
        return _TILES_INTERPRET[kind]
    if _use_small or D > 128:
        return _TILES_SMALL["fp32" if dtype == torch.float32 else "16bit"]
    table = _TILES_FP32 if dtype == torch.float32 else _TILES_16BIT
    return table[64 if D <= 64 else 128][kind]


def _launch(kernel, kind, grid_of, args, *, has_docs, dtype, D):
    """Launch with this call's compile-time options and the tile table; on OutOfResources (a GPU
    with less shared memory than an H100) retry with small tiles, and keep them for the rest of the
    process."""
    global _use_small
    interpret = interpreting()
    bm, bn, warps, stages = _tiles(kind, dtype, D, interpret)
    consts = dict(
        HAS_DOCS=has_docs,
        UPCAST=interpret,
        DOT_PREC=_dot_precision(dtype),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    try:
        kernel[grid_of(bm, bn)](
            *args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )
    except OutOfResources:
        if _use_small or interpret:
            raise
        _use_small = True
        log_once(
            "ttt_attention.small_tiles",
            "ttt_attention: GPU lacks shared memory for the default tiles; using small ones",
        )
        _launch(kernel, kind, grid_of, args, has_docs=has_docs, dtype=dtype, D=D)


def _dot_precision(dtype):
    """fp32 operands: exact unless torch allows TF32 matmuls. fp16/bf16 operands: "tf32" is Triton's
    default and has no effect on them."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class _TTTAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, values, doc_ids, scale):
        S, B, Hkv, L, D = keys.shape
        Hq = q.shape[1]
        has_docs = doc_ids is not None
        if has_docs:
            start, end, _ = _doc_runs(doc_ids)
        else:
            start = end = torch.zeros(1, dtype=torch.int32, device=q.device)  # unused
        out = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, Hq, L, dtype=torch.float32, device=q.device)
        strides = (*q.stride(), *keys.stride(), *values.stride(), *out.stride())
        args = (q, keys, values, out, lse, start, *strides, S, Hq, L, D, Hq // Hkv, scale * _LOG2E)
        launch = functools.partial(_launch, has_docs=has_docs, dtype=q.dtype, D=D)
        launch(_ttt_fwd_kernel, "fwd", lambda bm, bn: (triton.cdiv(L, bm), B * Hq), args)

        ctx.save_for_backward(q, out, lse, start, end)
        ctx.keys, ctx.values = keys, values  # by reference: see the module docstring
        ctx.scale, ctx.has_docs = scale, has_docs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, lse, start, end = ctx.saved_tensors
        keys, values = ctx.keys, ctx.values
        S, B, Hkv, L, D = keys.shape
        Hq = q.shape[1]
        scale = ctx.scale
        delta = (dout.float() * out.float()).sum(-1).contiguous()  # rowsum(dO·O), [B, Hq, L]
        dq = torch.empty(B, Hq, L, D, dtype=q.dtype, device=q.device)
        dk = torch.empty(S, B, Hkv, L, D, dtype=keys.dtype, device=q.device)
        dv = torch.empty(S, B, Hkv, L, D, dtype=values.dtype, device=q.device)
        launch = functools.partial(_launch, has_docs=ctx.has_docs, dtype=q.dtype, D=D)
        strides = (*q.stride(), *keys.stride(), *values.stride(), *dout.stride())
        tail = (L, D, Hq // Hkv, scale, scale * _LOG2E)
        args = (q, keys, values, dout, dq, lse, delta, start, *strides, S, Hq, *tail)
        launch(_ttt_bwd_dq_kernel, "dq", lambda bm, bn: (triton.cdiv(L, bm), B * Hq), args)
        args = (q, keys, values, dout, dk, dv, lse, delta, start, end, *strides, S, B, Hkv, *tail)
        launch(_ttt_bwd_dkdv_kernel, "dkdv", lambda bm, bn: (triton.cdiv(L, bn), B * Hkv), args)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------------------
# torch path (CPU)
# --------------------------------------------------------------------------------------------------
def _segments(doc_ids, B, L):
    """[(b or None, start, end)]: one causal flash call each. Without documents: the whole batch at
    once."""
    if doc_ids is None:
        return [(None, 0, L)]
    _, _, first = _doc_runs(doc_ids)
    segs = []
    for b in range(B):
        starts = first[b].nonzero().flatten().tolist() + [L]
        segs += [(b, s0, s1) for s0, s1 in zip(starts[:-1], starts[1:])]
    return segs


def _piece(x, b, s0, s1):
    """Rows [s0, s1) of batch b (all batches when b is None) of a [B, H, L, D] or [B, H, L]
    tensor."""
    x = x if b is None else x[b : b + 1]
    return x[:, :, s0:s1]


def _flash_causal_fwd(q, k, v, segs, scale):
    """Causal flash attention of each segment on its own: (out [B, H, L, D], lse [B, H, L] fp32)."""
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if len(segs) == 1 and segs[0][0] is None:
        return fwd(q, k, v, 0.0, True, scale=scale)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    for b, s0, s1 in segs:
        o, m = fwd(*(_piece(x, b, s0, s1).contiguous() for x in (q, k, v)), 0.0, True, scale=scale)
        _piece(out, b, s0, s1).copy_(o)
        _piece(lse, b, s0, s1).copy_(m)
    return out, lse


def _flash_causal_bwd(dout, q, k, v, out, lse, segs, scale):
    """(dq, dk, dv) of each segment's causal flash attention, given the output and LSE to use."""
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if len(segs) == 1 and segs[0][0] is None:
        return bwd(dout.contiguous(), q, k, v, out, lse, 0.0, True, scale=scale)
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for b, s0, s1 in segs:
        pieces = (_piece(x, b, s0, s1).contiguous() for x in (dout, q, k, v, out, lse))
        for grad, g in zip(grads, bwd(*pieces, 0.0, True, scale=scale)):
            _piece(grad, b, s0, s1).copy_(g)
    return grads


class _TTTAttentionTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, keys, values, doc_ids, scale):
        S, B, Hkv, L, D = keys.shape
        Hq = q.shape[1]
        g = Hq // Hkv
        segs = _segments(doc_ids, B, L)
        # Expanded step-0 heads: older torch's CPU flash kernel has no GQA. O(L) memory.
        k0 = keys[0].repeat_interleave(g, dim=1)
        v0 = values[0].repeat_interleave(g, dim=1)
        out_c, lse_c = _flash_causal_fwd(q, k0, v0, segs, scale)

        # Merge with the diagonal terms through the LSE; head index h = hk·g + j.
        qg = q.float().reshape(B, Hkv, g, L, D)
        d = torch.einsum("bkgld,sbkld->sbkgl", qg, keys[1:].float()) * scale  # [S-1, B, Hkv, g, L]
        lse_all = torch.cat([lse_c.reshape(1, B, Hkv, g, L), d], dim=0).logsumexp(
            dim=0
        )  # [B, Hkv, g, L]
        out = torch.exp(lse_c.reshape(B, Hkv, g, L) - lse_all)[..., None] * out_c.float().reshape(
            B, Hkv, g, L, D
        )
        out = out + torch.einsum("sbkgl,sbkld->bkgld", torch.exp(d - lse_all), values[1:].float())
        out = out.reshape(B, Hq, L, D).to(q.dtype)
        lse_all = lse_all.reshape(B, Hq, L)

        ctx.save_for_backward(q, out, lse_all)
        ctx.keys, ctx.values = keys, values  # by reference: see the module docstring
        ctx.scale, ctx.segs = scale, segs
        return out

    @staticmethod
    def backward(ctx, dout):
        # The backward runs under the caller's autocast too; its einsums keep their own dtypes.
        with torch.autocast("cpu", enabled=False):
            return _TTTAttentionTorch._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        q, out, lse_all = ctx.saved_tensors
        keys, values = ctx.keys, ctx.values
        S, B, Hkv, L, D = keys.shape
        Hq = q.shape[1]
        g = Hq // Hkv
        scale = ctx.scale
        dout = dout.to(q.dtype)
        k0 = keys[0].repeat_interleave(g, dim=1)  # rebuilt rather than held across the TTT steps
        v0 = values[0].repeat_interleave(g, dim=1)

        # Causal part: the flash backward fed the merged output and LSE gives exactly this part's
        # share of the merged attention's gradients
        # (P_ij = exp(s_ij − lse_all), rowsum(dO·O_merged)).
        dq, dk0, dv0 = _flash_causal_bwd(dout, q, k0, v0, out, lse_all, ctx.segs, scale)

        dk = torch.empty(S, B, Hkv, L, D, dtype=keys.dtype)
        dv = torch.empty(S, B, Hkv, L, D, dtype=values.dtype)
        dk[0] = dk0.float().reshape(B, Hkv, g, L, D).sum(2)
        dv[0] = dv0.float().reshape(B, Hkv, g, L, D).sum(2)
        if S > 1:
            qg = q.float().reshape(B, Hkv, g, L, D)
            dog = dout.float().reshape(B, Hkv, g, L, D)
            ks, vs = keys[1:].float(), values[1:].float()
            delta = (dog * out.float().reshape(B, Hkv, g, L, D)).sum(-1)  # [B, Hkv, g, L]
            p = torch.exp(
                torch.einsum("bkgld,sbkld->sbkgl", qg, ks) * scale - lse_all.reshape(B, Hkv, g, L)
            )
            ds = p * (torch.einsum("bkgld,sbkld->sbkgl", dog, vs) - delta)
            dq = (
                dq.float() + scale * torch.einsum("sbkgl,sbkld->bkgld", ds, ks).reshape(B, Hq, L, D)
            ).to(q.dtype)
            dk[1:] = scale * torch.einsum("sbkgl,bkgld->sbkld", ds, qg)
            dv[1:] = torch.einsum("sbkgl,bkgld->sbkld", p, dog)
        return dq, dk, dv, None, None


# --------------------------------------------------------------------------------------------------
def ttt_attention(q, keys, values, doc_ids=None, scale=None, *, backend="auto"):
    """q [B, Hq, L, D]; keys, values [S, B, Hkv, L, D] (any strides, e.g. a slice of a preallocated
    buffer); doc_ids [B, L] integer or None, each document one contiguous run per row.
    Returns [B, Hq, L, D] in q's dtype; differentiable in q, keys and values.

    backend: "auto" (CUDA → Triton, CPU → torch; Triton on CPU tensors only under TRITON_INTERPRET=1
    when asked for explicitly), "triton", "torch", or "reference" (the dense-mask definition).
    """
    _check(q, keys, values, doc_ids)
    scale = keys.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = env_backend(backend)
    if backend == "auto":
        if q.is_cuda and triton_available():
            backend = "triton"
        elif q.device.type == "cpu":
            backend = "torch"
        else:
            backend = "reference"
        log_once(
            f"ttt_attention.{q.device.type}.{backend}",
            f"ttt_attention: {backend} path on {q.device.type}"
            + (
                " (no Triton kernel or CPU flash path for this device: dense reference)"
                if backend == "reference"
                else ""
            ),
        )
    if backend == "reference":
        return ttt_attention_reference(q, keys, values, doc_ids, scale)
    if backend == "triton":
        if triton is None:
            raise RuntimeError("ttt_attention: backend='triton' needs the triton package")
        if not q.is_cuda and not interpreting():
            raise RuntimeError("ttt_attention: Triton on CPU tensors needs TRITON_INTERPRET=1")
        return _TTTAttentionTriton.apply(q, keys, values, doc_ids, scale)
    if backend == "torch":
        if q.device.type != "cpu":
            raise RuntimeError(
                "ttt_attention: backend='torch' is the CPU path; use 'triton' on CUDA"
            )
        # It computes in its inputs' dtype and fp32 by itself: autocast would round its sums.
        with torch.autocast("cpu", enabled=False):
            return _TTTAttentionTorch.apply(q, keys, values, doc_ids, scale)
    raise ValueError(f"ttt_attention: unknown backend {backend!r}")
