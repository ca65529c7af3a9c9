"""Rotary position embedding, rotate-half (Llama) convention, angles computed from the positions.

    θ[b, t, i] = (positions[b, t] + offset) · inv_freq[i]                  (fp32, i < D/2)
    c, s       = cos θ · scaling, sin θ · scaling, rounded to x.dtype
    y[..., :D/2] = x₁ c − x₂ s,   y[..., D/2:] = x₂ c + x₁ s               (x₁, x₂ the two halves)

This is the draft's `RotaryEmbedding` (whatever rope type set inv_freq and scaling) followed by
`apply_rope`. The backward is the rotation by −θ: no tensor is kept but the positions.

Why positions and inv_freq rather than cos/sin [B, T, D]: the tables are built by separate kernels
(2·D values per token written, then read once per call, in forward and again in backward or kept
alive across the TTT unroll, one set per step since the offset moves them), while positions cost
8 bytes per token and inv_freq D/2 floats in cache. The trig is recomputed per token, once for
all heads, so it is amortised over nh·D elements. `offset` folds the per-step shift in without
materialising positions + k.

Three implementations of the same math:
- `rope_reference`: the definition (cos/sin tables as draft.py builds them, then apply_rope).
- Triton (CUDA, or anywhere under TRITON_INTERPRET=1): one token per program, all heads, fp32.
  tl.cos / tl.sin lower to libdevice's __nv_cosf / __nv_sinf (full range reduction; a test checks
  the PTX holds no cos.approx), so large positions stay as accurate as torch's tables.
- torch (CPU, any device): half-width tables [B, T, D/2] and the two half products written into
  the output, no rotated copy.
"""

import torch

from ._dispatch import choose_backend, interpreting, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # CPU-only installs without the `triton` extra still get the torch path
    triton = None


def rope_reference(x, positions, inv_freq, scaling=1.0, offset=0):
    """The definition: draft.py's RotaryEmbedding(positions + offset, x.dtype) and apply_rope."""
    freqs = (positions + offset).float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * scaling).to(x.dtype)
    sin = (emb.sin() * scaling).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _check(x, positions, inv_freq):
    assert x.dim() == 4, f"x: [B, heads, T, D], got {tuple(x.shape)}"
    B, _, T, D = x.shape
    assert D % 2 == 0, f"rope: head dim {D} must be even"
    assert positions.shape == (B, T), f"positions {tuple(positions.shape)}, expected {(B, T)}"
    assert not positions.is_floating_point(), "rope: positions must be integers"
    assert inv_freq.shape == (D // 2,), f"inv_freq {tuple(inv_freq.shape)}, expected {(D // 2,)}"


# --------------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------------
def _rotate_torch(x, positions, inv_freq, scaling, offset, sign):
    """Rotation by sign·θ with half-width tables, written into one output in x's layout (no
    rotated copy, no concatenation)."""
    freqs = (positions + offset).float()[:, None, :, None] * inv_freq.float()  # [B, 1, T, D/2]
    cos = (freqs.cos() * scaling).to(x.dtype)
    sin = (freqs.sin() * (sign * scaling)).to(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    y = torch.empty_like(x)
    y1, y2 = y[..., :half], y[..., half:]
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin)
    return y


class _RoPETorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq, scaling, offset):
        ctx.save_for_backward(positions, inv_freq)
        ctx.scaling, ctx.offset = scaling, offset
        return _rotate_torch(x, positions, inv_freq, scaling, offset, 1.0)

    @staticmethod
    def backward(ctx, dy):
        positions, inv_freq = ctx.saved_tensors
        dx = _rotate_torch(dy, positions, inv_freq, ctx.scaling, ctx.offset, -1.0)
        return dx, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rope_kernel(
        X,
        Y,
        P,
        F,
        sx_b,
        sx_h,
        sx_t,
        sx_d,
        sy_b,
        sy_h,
        sy_t,
        sy_d,
        sp_b,
        sp_t,
        T,
        NH,
        HALF,
        offset,
        scaling,
        BACKWARD: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        """Token (b, t) = divmod(pid, T), all heads, BLOCK_H heads at a time. BACKWARD rotates by −θ
        (the transpose of the rotation)."""
        pid = tl.program_id(0)
        b = (pid // T).to(tl.int64)
        t = (pid % T).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)
        j_ok = j < HALF
        pos = tl.load(P + b * sp_b + t * sp_t).to(tl.int64) + offset
        theta = pos.to(tl.float32) * tl.load(F + j, mask=j_ok, other=0.0)
        # Rounded to x's dtype, as the reference's cos/sin tables are.
        c = (tl.cos(theta) * scaling).to(X.dtype.element_ty).to(tl.float32)
        s = (tl.sin(theta) * scaling).to(X.dtype.element_ty).to(tl.float32)
        if BACKWARD:
            s = -s
        x_row = X + b * sx_b + t * sx_t
        y_row = Y + b * sy_b + t * sy_t
        for h0 in range(0, NH, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            ok = (hs < NH)[:, None] & j_ok[None, :]
            x1p = x_row + hs[:, None] * sx_h + j[None, :] * sx_d
            y1p = y_row + hs[:, None] * sy_h + j[None, :] * sy_d
            x1 = tl.load(x1p, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(x1p + HALF * sx_d, mask=ok, other=0.0).to(tl.float32)
            tl.store(y1p, (x1 * c[None, :] - x2 * s[None, :]).to(Y.dtype.element_ty), mask=ok)
            tl.store(
                y1p + HALF * sy_d,
                (x2 * c[None, :] + x1 * s[None, :]).to(Y.dtype.element_ty),
                mask=ok,
            )


def _block_h(nh, half_block, interpret):
    """Heads per tile: up to 4096 elements per half (8 KiB of fp32 registers per operand on a GPU).
    Under the interpreter at most 2, so the tests cover a head count off the tile."""
    cap = 2 if interpret else max(1, 4096 // half_block)
    return min(triton.next_power_of_2(nh), cap)


def _triton_rotate(x, positions, inv_freq, scaling, offset, backward):
    """Output in x's layout (empty_like keeps a transposed projection's strides)."""
    B, NH, T, D = x.shape
    y = torch.empty_like(x)
    if y.numel():
        half_block = triton.next_power_of_2(D // 2)
        block_h = _block_h(NH, half_block, interpreting())
        _rope_kernel[(B * T,)](
            x,
            y,
            positions,
            inv_freq,
            *x.stride(),
            *y.stride(),
            *positions.stride(),
            T,
            NH,
            D // 2,
            offset,
            scaling,
            BACKWARD=backward,
            BLOCK_H=block_h,
            BLOCK_HALF=half_block,
            num_warps=4,
        )
    return y


class _RoPETriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq, scaling, offset):
        inv_freq = inv_freq.float().contiguous()
        ctx.save_for_backward(positions, inv_freq)
        ctx.scaling, ctx.offset = scaling, offset
        return _triton_rotate(x, positions, inv_freq, scaling, offset, False)

    @staticmethod
    def backward(ctx, dy):
        positions, inv_freq = ctx.saved_tensors
        return (
            _triton_rotate(dy, positions, inv_freq, ctx.scaling, ctx.offset, True),
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------------------------------
def rope(x, positions, inv_freq, scaling=1.0, offset=0, *, backend="auto"):
    """Rotary embedding of x [B, heads, T, D] (any strides, e.g. a transposed projection) at integer
    positions [B, T] + offset (an int: the TTT step's shift), with the rope type's inv_freq [D/2]
    (fp32) and attention scaling. Call once for q and once for k. Returns x's shape and dtype (the
    Triton path keeps x's memory layout); differentiable in x.

    backend: "auto" (CUDA → Triton, otherwise torch), "triton", "torch" or "reference".

    Cost per element of x: 3 FLOPs (two multiplies, one add) plus, per token, D/2 sin/cos pairs
    shared by all heads; 2·s bytes (read x, write y: 4 B in bf16), the minimum, plus 8 bytes of
    position per token. Backward: the same. A cos/sin-table variant would also read 2·D·s bytes
    per token (1/heads more traffic: +12.5% for k with 8 KV heads) after building the tables.
    Memory-bound, far below any GPU's ridge point.
    """
    _check(x, positions, inv_freq)
    backend = choose_backend("rope", x, backend)
    offset, scaling = int(offset), float(scaling)
    if backend == "reference":
        return rope_reference(x, positions, inv_freq, scaling, offset)
    if backend == "torch":
        return _RoPETorch.apply(x, positions, inv_freq, scaling, offset)
    return _RoPETriton.apply(x, positions, inv_freq, scaling, offset)
