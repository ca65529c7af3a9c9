"""SwiGLU, the gated activation between the draft MLP's gate/up and down projections.

    y = silu(gate) · up,   silu(g) = g · σ(g)
    dgate = dy · up · σ(g) · (1 + g · (1 − σ(g))),   dup = dy · silu(g)

Three implementations of the same math:
- `swiglu_reference`: the definition, as draft.py writes it (`F.silu(gate) * up`).
- Triton (CUDA, or anywhere under TRITON_INTERPRET=1): one row × one column block per program, fp32
  math and a single rounding of the result; the backward recomputes σ(g) from the gate it reloads.
- torch (CPU, any device): the reference's forward and aten's fused silu derivative, allocating
  only the outputs. Either fast path keeps only gate and up for the backward (autograd through the
  reference also keeps silu(gate)).
"""

import torch
import torch.nn.functional as F

from ._dispatch import choose_backend, interpreting, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # CPU-only installs without the `triton` extra still get the torch path
    triton = None


def swiglu_reference(gate, up):
    """The definition (draft.py's MLP, between its projections)."""
    return F.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# torch path
# --------------------------------------------------------------------------------------------------
class _SwiGLUTorch(torch.autograd.Function):
    """Gate and up of one dtype (the caller promotes). Only the outputs are allocated: every other
    step runs in place on them, and the backward uses aten's fused silu derivative."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)  # the reference's two roundings, one allocation

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        need_dg, need_du = ctx.needs_input_grad
        dg = du = None
        if need_dg:
            dg = dy * up
            torch.ops.aten.silu_backward(dg, gate, grad_input=dg)  # dg·σ(g)·(1 + g·(1 − σ(g)))
        if need_du:
            du = F.silu(gate).mul_(dy)
        return dg, du


# --------------------------------------------------------------------------------------------------
# Triton path
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(G, U, Y, sg0, sg1, su0, su1, N_COLS, BLOCK: tl.constexpr):
        """Row pid 0, columns of block pid 1. Y contiguous."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N_COLS
        g = tl.load(G + row * sg0 + cols * sg1, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + row * su0 + cols * su1, mask=ok, other=0.0).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(Y + row * N_COLS + cols, y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_bwd_kernel(
        G,
        U,
        DY,
        DG,
        DU,
        sg0,
        sg1,
        su0,
        su1,
        sdy0,
        sdy1,
        N_COLS,
        NEED_DG: tl.constexpr,
        NEED_DU: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """DG, DU contiguous; σ(g) recomputed (cheaper than a stored tensor's bytes)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N_COLS
        g = tl.load(G + row * sg0 + cols * sg1, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * sdy0 + cols * sdy1, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        if NEED_DG:
            u = tl.load(U + row * su0 + cols * su1, mask=ok, other=0.0).to(tl.float32)
            dg = dy * u * sig * (1.0 + g * (1.0 - sig))
            tl.store(DG + row * N_COLS + cols, dg.to(DG.dtype.element_ty), mask=ok)
        if NEED_DU:
            tl.store(DU + row * N_COLS + cols, (dy * g * sig).to(DU.dtype.element_ty), mask=ok)


def _grid(n_rows, n_cols):
    """(grid, BLOCK): a row's columns in blocks of up to 1024 (64 under the interpreter, so the
    tests' odd widths span several blocks with a ragged last one)."""
    block = min(triton.next_power_of_2(n_cols), 64 if interpreting() else 1024)
    return (n_rows, triton.cdiv(n_cols, block)), block


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        width = gate.shape[-1]
        g2, u2 = gate.reshape(-1, width), up.reshape(-1, width)
        y = torch.empty(
            gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device
        )
        if y.numel():
            grid, block = _grid(g2.shape[0], width)
            _swiglu_fwd_kernel[grid](
                g2, u2, y, *g2.stride(), *u2.stride(), width, BLOCK=block, num_warps=4
            )
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        need_dg, need_du = ctx.needs_input_grad
        width = gate.shape[-1]
        g2, u2, dy2 = gate.reshape(-1, width), up.reshape(-1, width), dy.reshape(-1, width)
        dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if need_dg else None
        du = torch.empty(up.shape, dtype=up.dtype, device=up.device) if need_du else None
        if g2.numel() and (need_dg or need_du):
            grid, block = _grid(g2.shape[0], width)
            _swiglu_bwd_kernel[grid](
                g2,
                u2,
                dy2,
                dg if need_dg else g2,
                du if need_du else g2,
                *g2.stride(),
                *u2.stride(),
                *dy2.stride(),
                width,
                NEED_DG=need_dg,
                NEED_DU=need_du,
                BLOCK=block,
                num_warps=4,
            )
        return dg, du


# --------------------------------------------------------------------------------------------------
def swiglu(gate, up, *, backend="auto"):
    """silu(gate) · up for gate, up [..., I] of one shape (any strides: e.g. the two halves of a
    fused gate-up projection). Returns gate's shape, contiguous; differentiable in gate and up.

    backend: "auto" (CUDA → Triton, otherwise torch), "triton", "torch" or "reference".

    Cost per element: forward ~5 FLOPs and one exp (σ), 3·s bytes (read gate and up, write y:
    6 B in bf16), the minimum; unfused, silu and the product move 5·s. Backward ~11 FLOPs and one
    exp, 5·s bytes (read gate, up, dy; write dgate, dup), the minimum when σ is recomputed.
    Memory-bound (~1 FLOP/B), far below any GPU's ridge point.
    """
    assert gate.shape == up.shape, f"gate {tuple(gate.shape)} != up {tuple(up.shape)}"
    backend = choose_backend("swiglu", gate, backend)
    if backend == "reference":
        return swiglu_reference(gate, up)
    if backend == "torch":
        dtype = torch.promote_types(gate.dtype, up.dtype)  # autograd casts each grad back
        return _SwiGLUTorch.apply(gate.to(dtype), up.to(dtype))
    return _SwiGLUTriton.apply(gate, up)
