"""RMSNorm, and the residual add fused with the RMSNorm that follows it.

    rms_norm(x, w)         = w · (x̂ rounded to x.dtype),   x̂ = x · rsqrt(mean(x²) + eps) in fp32
    add_rms_norm(r, x, w)  = (h, rms_norm(h, w)),          h = r + x

This is the draft layer's `RMSNorm` exactly: statistics in fp32, the normalised row rounded to the
input's dtype before the weight multiplies it, so the output has the dtype of `weight · x`
(fp32 under bf16 autocast with fp32 weights).

Three implementations of the same math:
- `*_reference`: the definition, as draft.py writes it; plain autograd (test oracle).
- Triton (CUDA, or anywhere under TRITON_INTERPRET=1): forward one row per program in fp32; the
  backward recomputes rsqrt from the row it reloads anyway (nothing but the input is kept), each
  program walks a contiguous run of rows and keeps its share of dweight in registers, and the
  [programs, H] fp32 partials are summed afterwards (no atomics, deterministic).
- torch (CPU, any device): the same forward formulation, and an analytic backward that keeps only
  the input (autograd through the reference keeps four row-sized intermediates).

Gradients: x (or residual and x) and weight; the add variant's backward adds dh and writes one
tensor, returned for both residual and x when their dtypes match (as autograd's own add does).
"""

import functools

import torch

from ._dispatch import choose_backend, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # CPU-only installs without the `triton` extra still get the torch path
    triton = None


def rms_norm_reference(x, weight, eps):
    """The definition (draft.py's RMSNorm.forward)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_reference(residual, x, weight, eps):
    """The definition: h = residual + x; (h, RMSNorm(h))."""
    h = residual + x
    return h, rms_norm_reference(h, weight, eps)


def _check(x, weight):
    H = x.shape[-1]
    assert weight.shape == (H,), f"weight {tuple(weight.shape)} does not match hidden size {H}"


# --------------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------------
def _rstd(hf, eps):
    """rsqrt(mean(h²) + eps) [..., 1] from fp32 h, without a row-sized temporary."""
    sumsq = torch.linalg.vector_norm(hf, dim=-1, keepdim=True).square_()
    return torch.rsqrt(sumsq / hf.shape[-1] + eps)


def _torch_fwd(h, weight, eps):
    """The reference's rounding (x̂ to h's dtype, then the weight) in two row-sized passes."""
    hf = h.float()
    n = (hf * _rstd(hf, eps)).to(h.dtype)
    if torch.promote_types(weight.dtype, n.dtype) == n.dtype:
        return n.mul_(weight)
    return weight * n


def _torch_bwd(h, weight, eps, dy, dh, need_dx, need_dw):
    """(dx fp32 or None, dw in weight.dtype or None); dh (or None) is added to dx. In-place steps
    only on tensors made here (h.float() and dy.float() are the inputs themselves in fp32)."""
    H = h.shape[-1]
    hf = h.float()
    rstd = _rstd(hf, eps)
    xhat = hf * rstd
    dyf = dy.float()
    dw = dx = None
    if need_dw:  # the forward multiplied the weight by x̂ rounded to h's dtype
        xr = xhat.to(h.dtype).float()
        dw = (dyf * xr).reshape(-1, H).sum(0).to(weight.dtype)
    if need_dx:
        dn = dyf * weight
        c = torch.einsum("...h,...h->...", dn, xhat).unsqueeze(-1) / H  # row dots: no temporary
        dx = dn.sub_(xhat.mul_(c)).mul_(rstd)
        if dh is not None:
            dx += dh
    return dx, dw


class _RMSNormTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _torch_fwd(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = _torch_bwd(x, weight, ctx.eps, dy, None, *ctx.needs_input_grad[:2])
        return (None if dx is None else dx.to(x.dtype)), dw, None


class _AddRMSNormTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, x, weight, eps):
        h = residual + x
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.dtypes = eps, (residual.dtype, x.dtype)
        ctx.set_materialize_grads(False)
        return h, _torch_fwd(h, weight, eps)

    @staticmethod
    def backward(ctx, dh, dy):
        return _add_norm_backward(ctx, dh, dy, _torch_bwd)


def _add_norm_backward(ctx, dh, dy, bwd):
    """Gradients of add_rms_norm for either path; `bwd` is the path's norm backward."""
    h, weight = ctx.saved_tensors
    need_d = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    if dy is None:  # y unused: h's gradient passes straight through the add
        d, dw = dh, None
    else:
        d, dw = bwd(h, weight, ctx.eps, dy, dh, need_d, ctx.needs_input_grad[2])
    if d is None or not need_d:
        return None, None, dw, None
    # One tensor serves both inputs when their dtypes agree.
    dr = d.to(ctx.dtypes[0])
    return dr, (dr if ctx.dtypes[1] == ctx.dtypes[0] else d.to(ctx.dtypes[1])), dw, None


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rms_fwd_kernel(
        X,
        R,
        W,
        Hout,
        Y,
        sx0,
        sx1,
        sr0,
        sr1,
        N_COLS,
        eps,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row. HAS_RES: h = X + R is stored to Hout and normalised. Hout, Y contiguous."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N_COLS
        x = tl.load(X + row * sx0 + cols * sx1, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(R + row * sr0 + cols * sr1, mask=ok, other=0.0).to(tl.float32)
            h = (x + r).to(Hout.dtype.element_ty)  # rounded as the reference's add rounds it
            tl.store(Hout + row * N_COLS + cols, h, mask=ok)
            x = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / N_COLS + eps)
        if HAS_RES:
            n = (x * rstd).to(Hout.dtype.element_ty).to(tl.float32)
        else:
            n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * N_COLS + cols, (w * n).to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _rms_bwd_kernel(
        X,
        W,
        DY,
        DH,
        DX,
        DWP,
        sx0,
        sx1,
        sdy0,
        sdy1,
        sdh0,
        sdh1,
        N_ROWS,
        N_COLS,
        ROWS_PER_PROG,
        eps,
        HAS_DH: tl.constexpr,
        NEED_DX: tl.constexpr,
        NEED_DW: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Rows [pid·ROWS_PER_PROG, …) one at a time; this program's dweight partial to DWP[pid].
        DX contiguous."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N_COLS
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        row0 = pid.to(tl.int64) * ROWS_PER_PROG
        for row in range(row0, tl.minimum(row0 + ROWS_PER_PROG, N_ROWS)):
            x = tl.load(X + row * sx0 + cols * sx1, mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * sdy0 + cols * sdy1, mask=ok, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(x * x, 0) / N_COLS + eps)  # recomputed: the row is loaded anyway
            xhat = x * rstd
            if NEED_DW:  # the forward multiplied the weight by x̂ rounded to x's dtype
                dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
            if NEED_DX:
                dn = dy * w
                dx = rstd * (dn - xhat * (tl.sum(dn * xhat, 0) / N_COLS))
                if HAS_DH:
                    dx += tl.load(DH + row * sdh0 + cols * sdh1, mask=ok, other=0.0).to(tl.float32)
                tl.store(DX + row * N_COLS + cols, dx.to(DX.dtype.element_ty), mask=ok)
        if NEED_DW:
            tl.store(DWP + pid * N_COLS + cols, dw, mask=ok)


def _rows(t, H):
    """A [N, H] view (a copy only when the leading dims cannot be merged)."""
    return t.reshape(-1, H)


def _launch_cfg(H):
    """(BLOCK, num_warps): the whole row in one tile, 256 columns per warp from 4 to 16 warps.
    Compiled for sm_90 (tests/test_unroll_kernels.py repeats it) neither kernel spills up to
    H = 4096 and the backward spills 8 bytes at 8192; wider rows spill more. Not yet timed on a GPU.
    """
    block = triton.next_power_of_2(H)
    assert block <= 65536, f"rms_norm: hidden size {H} is above the one-row-per-program limit"
    return block, min(16, max(4, block // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bwd_programs(n_rows, device, need_dw):
    """Without dweight: one row per program. With it: few programs, so the [programs, H] partials
    stay small next to the rows (two per SM on a GPU; three under the interpreter, which makes the
    last run of rows ragged in the tests)."""
    if not need_dw:
        return n_rows
    if device.type == "cuda":
        return min(n_rows, 2 * _sm_count(device.index or 0))
    return min(n_rows, 3)


def _triton_fwd(x, residual, weight, eps, h_dtype, y_dtype):
    """(h or None, y), both contiguous in x's shape; h only when a residual is given."""
    H = x.shape[-1]
    block, warps = _launch_cfg(H)
    y = torch.empty(x.shape, dtype=y_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if residual is not None else None
    x2 = _rows(x, H)
    if x2.shape[0]:
        r2 = _rows(residual, H) if residual is not None else x2
        _rms_fwd_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            h if h is not None else y,
            y,
            *x2.stride(),
            *r2.stride(),
            H,
            eps,
            HAS_RES=residual is not None,
            BLOCK=block,
            num_warps=warps,
        )
    return h, y


def _triton_bwd(x, weight, eps, dy, dh, need_dx, need_dw, dx_dtype):
    """(dx in x's shape and dx_dtype, contiguous, or None; dw in weight.dtype or None)."""
    H = x.shape[-1]
    block, warps = _launch_cfg(H)
    x2, dy2 = _rows(x, H), _rows(dy, H)
    dh2 = _rows(dh, H) if dh is not None else dy2
    N = x2.shape[0]
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device) if need_dx else None
    P = _bwd_programs(N, x.device, need_dw)
    dwp = torch.empty(P, H, dtype=torch.float32, device=x.device) if need_dw else None
    if N and (need_dx or need_dw):
        _rms_bwd_kernel[(P,)](
            x2,
            weight,
            dy2,
            dh2,
            dx if need_dx else x2,
            dwp if need_dw else x2,
            *x2.stride(),
            *dy2.stride(),
            *dh2.stride(),
            N,
            H,
            triton.cdiv(N, P),
            eps,
            HAS_DH=dh is not None,
            NEED_DX=need_dx,
            NEED_DW=need_dw,
            BLOCK=block,
            num_warps=warps,
        )
    dw = None
    if need_dw:
        dw = dwp.sum(0).to(weight.dtype) if N else torch.zeros_like(weight)
    return dx, dw


class _RMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        weight = weight.contiguous()
        _, y = _triton_fwd(x, None, weight, eps, None, torch.promote_types(weight.dtype, x.dtype))
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx, dw = _triton_bwd(x, weight, ctx.eps, dy, None, *ctx.needs_input_grad[:2], x.dtype)
        return dx, dw, None


class _AddRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, x, weight, eps):
        weight = weight.contiguous()
        h_dtype = torch.promote_types(residual.dtype, x.dtype)
        h, y = _triton_fwd(
            x, residual, weight, eps, h_dtype, torch.promote_types(weight.dtype, h_dtype)
        )
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.dtypes = eps, (residual.dtype, x.dtype)
        ctx.set_materialize_grads(False)
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        def bwd(h, weight, eps, dy, dh, need_d, need_dw):
            return _triton_bwd(h, weight, eps, dy, dh, need_d, need_dw, h.dtype)

        return _add_norm_backward(ctx, dh, dy, bwd)


# --------------------------------------------------------------------------------------------------
def rms_norm(x, weight, eps, *, backend="auto"):
    """RMSNorm over the last dim: x [..., H] (any float dtype; the leading dims need not be
    contiguous), weight [H]. Returns [..., H] in the dtype of `weight · x`; differentiable in x and
    weight.

    backend: "auto" (CUDA → Triton, otherwise torch), "triton", "torch" or "reference".

    Cost per element of x (s = bytes per element; the weight is read once per row from cache):
    forward ~4 FLOPs (square-accumulate, scale, weight multiply) and s_x + s_y bytes, the minimum
    (read x once, write y once: 4 B for bf16 → bf16, 6 B for bf16 x with an fp32 weight);
    backward ~11 FLOPs (rsqrt recomputed) and s_x + s_dy + s_dx bytes, also the minimum, plus the
    dweight partials, 8·programs·H bytes, independent of the row count. At ≤ 2 FLOP/B both are far
    below any GPU's ridge point: memory-bound, so time ≈ bytes / bandwidth.
    """
    _check(x, weight)
    backend = choose_backend("rms_norm", x, backend)
    if backend == "reference":
        return rms_norm_reference(x, weight, eps)
    if backend == "torch":
        return _RMSNormTorch.apply(x, weight, float(eps))
    return _RMSNormTriton.apply(x, weight, float(eps))


def add_rms_norm(residual, x, weight, eps, *, backend="auto"):
    """h = residual + x, and RMSNorm(h): the post-attention residual add and norm in one pass.
    residual, x [..., H] of one shape; weight [H]. Returns (h, y), h in the dtype of `residual + x`,
    y in that of `weight · h`; differentiable in residual, x and weight.

    backend: "auto" (CUDA → Triton, otherwise torch), "triton", "torch" or "reference".

    Cost per element: forward ~5 FLOPs, 2·s_in + s_h + s_y bytes (read residual and x, write h and
    y: 8 B in bf16) against 5·s for an add and a separate norm; backward ~12 FLOPs,
    s_h + s_dy + s_dh + s_d bytes (one gradient tensor serves residual and x when their dtypes
    match: 8 B in bf16) plus the dweight partials. Memory-bound, as `rms_norm`.
    """
    assert residual.shape == x.shape, f"residual {tuple(residual.shape)} != x {tuple(x.shape)}"
    _check(x, weight)
    backend = choose_backend("add_rms_norm", x, backend)
    if backend == "reference":
        return add_rms_norm_reference(residual, x, weight, eps)
    if backend == "torch":
        return _AddRMSNormTorch.apply(residual, x, weight, float(eps))
    return _AddRMSNormTriton.apply(residual, x, weight, float(eps))
