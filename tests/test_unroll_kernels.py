"""The per-step elementwise chain of the fused unroll (rms_norm, add_rms_norm, rope, swiglu): Triton
under TRITON_INTERPRET=1 and the torch path held to the plain-PyTorch references, forward and the
gradients of every differentiable input, on fresh random inputs of odd sizes."""

import logging

import pytest
import torch
from specfast.kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}
BACKENDS = ["torch", "triton"]
B = 2


def strided(shape, dtype, pad=7):
    """A slice of a wider buffer: the row stride is not the row length."""
    *lead, n = shape
    return torch.randn(*lead, n + pad, dtype=dtype)[..., 3 : 3 + n]


def assert_grads_match(fast_outs, ref_outs, inputs, tol):
    """Outputs equal, then the gradients of `inputs` for one random upstream gradient per output."""
    for i, (a, b) in enumerate(zip(fast_outs, ref_outs)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}"
        torch.testing.assert_close(
            a.float(), b.float(), **tol, msg=lambda m, i=i: f"output {i}: {m}"
        )
    ups = [torch.randn_like(b) for b in ref_outs]
    got = torch.autograd.grad(fast_outs, inputs, ups)
    want = torch.autograd.grad(ref_outs, inputs, ups)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"grad {i}"
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, i=i: f"grad {i}: {m}")


# --------------------------------------------------------------------------------------------------
# rms_norm, add_rms_norm
# --------------------------------------------------------------------------------------------------
# (T, H, x dtype, weight dtype): every T and H, fp32 and fp16, and the autocast case (fp16
# activations, fp32 weight, fp32 output). A covering set: the interpreter runs programs in Python.
NORM_CASES = [
    (1, 130, torch.float32, torch.float32),
    (7, 33, torch.float32, torch.float32),
    (19, 130, torch.float16, torch.float16),
    (7, 33, torch.float16, torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,dtype,w_dtype", NORM_CASES)
def test_rms_norm_matches_reference(seed, backend, T, H, dtype, w_dtype):
    x = strided((B, T, H), dtype).requires_grad_()
    w = torch.randn(H, dtype=w_dtype).requires_grad_()
    eps = 1e-6
    out = rms_norm(x, w, eps, backend=backend)
    assert_grads_match([out], [rms_norm_reference(x, w, eps)], (x, w), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_weight_grad_only(seed, backend):
    """The layer's input_layernorm(embed(tokens)): the input is frozen, only the weight learns."""
    x = torch.randn(B, 19, 33)
    w = torch.randn(33).requires_grad_()
    out = rms_norm(x, w, 1e-5, backend=backend)
    assert_grads_match([out], [rms_norm_reference(x, w, 1e-5)], (w,), TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,dtype,w_dtype", NORM_CASES)
def test_add_rms_norm_matches_reference(seed, backend, T, H, dtype, w_dtype):
    residual = torch.randn(B, T, H, dtype=dtype).requires_grad_()
    x = strided((B, T, H), dtype).requires_grad_()
    w = torch.randn(H, dtype=w_dtype).requires_grad_()
    outs = add_rms_norm(residual, x, w, 1e-6, backend=backend)
    ref = add_rms_norm_reference(residual, x, w, 1e-6)
    assert_grads_match(outs, ref, (residual, x, w), TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", ["h", "y"])
def test_add_rms_norm_one_output_used(seed, backend, use):
    """Either output alone carries the gradient (the other's arrives as None)."""
    residual = torch.randn(B, 7, 130).requires_grad_()
    x = torch.randn(B, 7, 130).requires_grad_()
    w = torch.randn(130).requires_grad_()
    pick = 0 if use == "h" else 1
    out = add_rms_norm(residual, x, w, 1e-6, backend=backend)[pick]
    ref = add_rms_norm_reference(residual, x, w, 1e-6)[pick]
    inputs = (residual, x) if use == "h" else (residual, x, w)
    assert_grads_match([out], [ref], inputs, TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_mixed_dtypes(seed, backend):
    """fp32 residual + fp16 x: h is fp32, and each input gets its gradient in its own dtype."""
    residual = torch.randn(B, 7, 33).requires_grad_()
    x = torch.randn(B, 7, 33, dtype=torch.float16).requires_grad_()
    w = torch.randn(33, dtype=torch.float16).requires_grad_()
    outs = add_rms_norm(residual, x, w, 1e-6, backend=backend)
    ref = add_rms_norm_reference(residual, x, w, 1e-6)
    assert outs[0].dtype == torch.float32
    assert_grads_match(outs, ref, (residual, x, w), TOL[torch.float16])


# --------------------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------------------
def rope_inputs(T, heads, D, dtype):
    """x in a projection's layout ([B, T, heads, D] transposed), positions spread over a long
    context (large angles), the default inv_freq, a random step offset and scaling."""
    x = torch.randn(B, T, heads, D, dtype=dtype).transpose(1, 2).requires_grad_()
    positions = torch.randint(0, 4096, (B, T))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    offset = int(torch.randint(0, 8, ()))
    scaling = float(torch.empty(()).uniform_(0.8, 1.4))
    return x, positions, inv_freq, scaling, offset


# (T, heads, D, dtype): D/2 odd (17) and a power of two, head counts off the interpreter tile of 2.
ROPE_CASES = [
    (1, 5, 34, torch.float32),
    (7, 3, 64, torch.float16),
    (19, 4, 34, torch.float16),
    (7, 5, 64, torch.float32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,heads,D,dtype", ROPE_CASES)
def test_rope_matches_reference(seed, backend, T, heads, D, dtype):
    x, positions, inv_freq, scaling, offset = rope_inputs(T, heads, D, dtype)
    out = rope(x, positions, inv_freq, scaling, offset, backend=backend)
    ref = rope_reference(x, positions, inv_freq, scaling, offset)
    assert_grads_match([out], [ref], (x,), TOL[dtype])
    if backend == "triton":
        assert out.stride() == x.stride()  # the projection's layout is kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_offset_is_a_position_shift(seed, backend):
    """offset=k is positions + k (the TTT step's shift), and a nonzero shift changes the answer."""
    x, positions, inv_freq, _, _ = rope_inputs(7, 3, 64, torch.float32)
    shifted = rope(x, positions, inv_freq, offset=3, backend=backend)
    torch.testing.assert_close(shifted, rope(x, positions + 3, inv_freq, backend=backend))
    assert (shifted - rope(x, positions, inv_freq, backend=backend)).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# swiglu
# --------------------------------------------------------------------------------------------------
# (T, width, dtype): widths off and across the interpreter's 64-column block.
SWIGLU_CASES = [
    (1, 130, torch.float32),
    (7, 33, torch.float16),
    (19, 33, torch.float32),
    (7, 130, torch.float16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,width,dtype", SWIGLU_CASES)
def test_swiglu_matches_reference(seed, backend, T, width, dtype):
    # gate and up as the two halves of one fused projection (strided views); a wide spread of
    # gate values reaches both saturated tails of the sigmoid.
    gate_up = (torch.randn(B, T, 2 * width, dtype=torch.float32) * 4).to(dtype).requires_grad_()
    gate, up = gate_up[..., :width], gate_up[..., width:]
    out = swiglu(gate, up, backend=backend)
    assert_grads_match([out], [swiglu_reference(gate, up)], (gate_up,), TOL[dtype])


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------
def test_auto_dispatch_on_cpu_says_torch_path_once(caplog):
    from specfast.kernels import _dispatch

    names = ("rms_norm", "add_rms_norm", "rope", "swiglu")
    _dispatch._said.difference_update({k for k in _dispatch._said if k.split(".")[0] in names})
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    q, positions, inv_freq, _, _ = rope_inputs(3, 2, 8, torch.float32)
    calls = {
        "rms_norm": lambda **kw: rms_norm(x, w, 1e-6, **kw),
        "add_rms_norm": lambda **kw: add_rms_norm(x, x, w, 1e-6, **kw)[1],
        "rope": lambda **kw: rope(q, positions, inv_freq, **kw),
        "swiglu": lambda **kw: swiglu(x, x, **kw),
    }
    with caplog.at_level(logging.INFO, logger="specfast.kernels"):
        for fn in calls.values():
            out = fn()
            fn()
            torch.testing.assert_close(out, fn(backend="torch"))
    for name in names:
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(name + ":")]
        assert said == [f"{name}: torch path on cpu"], said  # once, not per call
    with pytest.raises(ValueError, match="unknown backend"):
        calls["swiglu"](backend="cuda")


# Compiles the kernels for an H100/H200 (sm_90) with the ptxas in the Triton wheel, no GPU needed,
# as the JIT would specialise them (unit column strides, 16-byte-aligned pointers), at the largest
# common sizes with the launch settings the code picks: bf16 activations, an fp32 norm weight and
# output as under autocast, H = 4096, 32 heads of 128. Reads each kernel's spills and whether rope's
# sin/cos became the approximate instructions (wrong at large angles). In a subprocess: the kernels
# in this process were defined for the interpreter.
_COMPILE_FOR_SM90 = r"""
import importlib, json, os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
rn = importlib.import_module("specfast.kernels.rms_norm")
rp = importlib.import_module("specfast.kernels.rope")
sw = importlib.import_module("specfast.kernels.swiglu")
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
block, warps = rn._launch_cfg(4096)
(_, _), sw_block = sw._grid(1, 14336)
cases = [
    (rn._rms_fwd_kernel, dict(X="bf16", R="bf16", W="fp32", Hout="bf16", Y="fp32"),
     dict(HAS_RES=True, BLOCK=block), warps),
    (rn._rms_bwd_kernel, dict(X="bf16", W="fp32", DY="fp32", DH="bf16", DX="bf16", DWP="fp32"),
     dict(HAS_DH=True, NEED_DX=True, NEED_DW=True, BLOCK=block), warps),
    (rp._rope_kernel, dict(X="bf16", Y="bf16", P="i64", F="fp32"),
     dict(BACKWARD=False, BLOCK_H=rp._block_h(32, 64, False), BLOCK_HALF=64), 4),
    (sw._swiglu_fwd_kernel, dict(G="bf16", U="bf16", Y="bf16"), dict(BLOCK=sw_block), 4),
    (sw._swiglu_bwd_kernel, dict(G="bf16", U="bf16", DY="bf16", DG="bf16", DU="bf16"),
     dict(NEED_DG=True, NEED_DU=True, BLOCK=sw_block), 4),
]
unit = {"sx1", "sr1", "sdy1", "sdh1", "sx_d", "sy_d", "sg1", "su1"}
result = []
for fn, ptrs, consts, warps in cases:
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        if n in consts or n in unit:
            consts.setdefault(n, 1)
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "fp32" if n in ("eps", "scaling") else "i32"
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    ptx = k.asm["ptx"]
    result.append(dict(kernel=fn.__name__, stack=int(usage.split("STACK:")[1].split()[0]),
                       approx_trig="sin.approx" in ptx or "cos.approx" in ptx))
print(json.dumps(result))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_without_spills():
    import json
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("this Triton wheel ships no ptxas")
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) == 5
    for r in results:
        assert r["stack"] == 0, r
        assert not r["approx_trig"], r
