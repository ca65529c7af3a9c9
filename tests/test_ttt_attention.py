"""The fused TTT attention paths (Triton under TRITON_INTERPRET=1, and the CPU torch path) held to
the dense-mask reference: output and the gradients of q, keys and values, on fresh random inputs."""

import logging

import pytest
import torch
from specfast.kernels import ttt_attention, ttt_attention_reference

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def random_doc_ids(B, L, n_docs):
    """n_docs contiguous runs per row, numbered 0, 1, 2, … as the trainer does; random boundaries,
    a different layout per row, a one-token document allowed."""
    rows = []
    for _ in range(B):
        cuts = torch.randperm(L - 1)[: n_docs - 1].sort().values + 1
        row = torch.zeros(L, dtype=torch.long)
        for c in cuts.tolist():
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows)


def strided_kv(S, B, Hkv, L, D, dtype):
    """keys/values as a slice of a larger buffer in a foreign layout: non-contiguous strides."""
    buf = torch.randn(B, L + 5, S + 2, Hkv, D + 8, dtype=dtype)
    return buf.permute(2, 0, 3, 1, 4)[:S, :, :, :L, :D]


def run_and_compare(backend, S, B, Hq, Hkv, L, D, n_docs, dtype, scale=None):
    q = (
        torch.randn(B, L, Hq, D, dtype=dtype).transpose(1, 2).requires_grad_()
    )  # a projection's layout
    keys = strided_kv(S, B, Hkv, L, D, dtype).requires_grad_()
    values = strided_kv(S, B, Hkv, L, D, dtype).requires_grad_()
    assert not keys.is_contiguous()
    doc_ids = random_doc_ids(B, L, n_docs) if n_docs else None

    out = ttt_attention(q, keys, values, doc_ids, scale, backend=backend)
    grad = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, keys, values), grad))
    ref = ttt_attention_reference(q, keys, values, doc_ids, scale)
    want = (ref, *torch.autograd.grad(ref, (q, keys, values), grad))

    assert out.dtype == dtype and out.shape == (B, Hq, L, D)
    for name, a, b in zip(["out", "dq", "dkeys", "dvalues"], got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(
            a.float(), b.float(), **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}"
        )
    return q, keys, values, doc_ids


# (S, Hq, Hkv, L, D, n_docs, dtype): covers S ∈ {1, 2, 7}, GQA 1/3/4, D ∈ {64, 128}, documents and
# None, L off the 16-row interpreter tile, fp32 and fp16. The interpreter runs every program in
# Python, so this is a covering set rather than the full product.
TRITON_CASES = [
    (1, 2, 2, 37, 64, 3, torch.float32),
    (2, 6, 2, 45, 128, 0, torch.float32),
    (7, 4, 1, 50, 64, 4, torch.float32),
    (7, 3, 1, 33, 128, 0, torch.float32),
    (2, 4, 1, 41, 64, 0, torch.float16),
    (7, 6, 2, 39, 64, 3, torch.float16),
    (1, 3, 1, 29, 128, 2, torch.float16),
]


@pytest.mark.parametrize("S,Hq,Hkv,L,D,n_docs,dtype", TRITON_CASES)
def test_triton_matches_reference(seed, S, Hq, Hkv, L, D, n_docs, dtype):
    run_and_compare("triton", S, 2, Hq, Hkv, L, D, n_docs, dtype)


@pytest.mark.parametrize("S", [1, 2, 7])
@pytest.mark.parametrize("Hq,Hkv", [(3, 3), (6, 2), (8, 2)])
@pytest.mark.parametrize("n_docs", [0, 4])
@pytest.mark.parametrize("D", [64, 128])
def test_torch_cpu_matches_reference(seed, S, Hq, Hkv, n_docs, D):
    run_and_compare("torch", S, 2, Hq, Hkv, 53, D, n_docs, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_scale_and_one_token_documents(seed, backend):
    # every position its own document: step 0 contributes only the key at the same position
    q = torch.randn(1, 2, 19, 64).requires_grad_()
    keys = torch.randn(3, 1, 2, 19, 64).requires_grad_()
    values = torch.randn(3, 1, 2, 19, 64).requires_grad_()
    doc_ids = torch.arange(19)[None]
    out = ttt_attention(q, keys, values, doc_ids, scale=0.3, backend=backend)
    ref = ttt_attention_reference(q, keys, values, doc_ids, scale=0.3)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    g = torch.randn_like(out)
    for a, b in zip(
        torch.autograd.grad(out, (q, keys, values), g),
        torch.autograd.grad(ref, (q, keys, values), g),
    ):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_documents_change_the_answer(seed, backend):
    """Guards the test above against vacuous document cases: masking documents must matter."""
    q = torch.randn(1, 2, 40, 64)
    keys, values = torch.randn(2, 1, 2, 40, 64), torch.randn(2, 1, 2, 40, 64)
    doc_ids = random_doc_ids(1, 40, 3)
    with_docs = ttt_attention(q, keys, values, doc_ids, backend=backend)
    without = ttt_attention(q, keys, values, None, backend=backend)
    assert (with_docs - without).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_preallocated_buffer_across_steps(seed, backend):
    """The trainer's pattern: each step writes its keys/values into the next slice of one buffer and
    attends over buf[:k+1]; a single backward at the end must match the reference doing the same."""
    S, B, Hq, Hkv, L, D = 3, 1, 4, 2, 35, 64
    q = [torch.randn(B, Hq, L, D).requires_grad_() for _ in range(S)]
    k_in = [torch.randn(B, Hkv, L, D).requires_grad_() for _ in range(S)]
    v_in = [torch.randn(B, Hkv, L, D).requires_grad_() for _ in range(S)]
    doc_ids = random_doc_ids(B, L, 3)
    weights = [torch.randn(B, Hq, L, D) for _ in range(S)]
    grads = []
    for fn in (lambda *a: ttt_attention(*a, backend=backend), ttt_attention_reference):
        kbuf, vbuf = torch.zeros(S, B, Hkv, L, D), torch.zeros(S, B, Hkv, L, D)
        loss = 0.0
        for k in range(S):
            kbuf[k] = k_in[k]
            vbuf[k] = v_in[k]
            loss = loss + (fn(q[k], kbuf[: k + 1], vbuf[: k + 1], doc_ids) * weights[k]).sum()
        grads.append(torch.autograd.grad(loss, q + k_in + v_in))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_ignores_autocast(seed, dtype):
    """Under `--precision bf16` the trainer runs the draft in CPU autocast: the attention keeps its
    inputs' dtype and its own fp32 sums, forward and backward, bit for bit as without autocast."""
    S, B, Hq, Hkv, L, D = 3, 2, 4, 2, 29, 64
    q = torch.randn(B, Hq, L, D, dtype=dtype).requires_grad_()
    keys = strided_kv(S, B, Hkv, L, D, dtype).requires_grad_()
    values = strided_kv(S, B, Hkv, L, D, dtype).requires_grad_()
    doc_ids = random_doc_ids(B, L, 2)
    grad = torch.randn(B, Hq, L, D, dtype=dtype)
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = ttt_attention(q, keys, values, doc_ids, backend="torch")
            results.append((out, *torch.autograd.grad(out, (q, keys, values), grad)))
    assert results[1][0].dtype == dtype
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_contiguous_documents_rejected():
    q = torch.randn(1, 2, 8, 64)
    keys = values = torch.randn(2, 1, 2, 8, 64)
    doc_ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])  # document 0 comes back after a gap
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="contiguous"):
            ttt_attention(q, keys, values, doc_ids, backend=backend)


def test_auto_dispatch_on_cpu_says_torch_path(caplog):
    from specfast.kernels import _dispatch

    _dispatch._said.difference_update(
        {k for k in _dispatch._said if k.startswith("ttt_attention.")}
    )
    q = torch.randn(1, 2, 8, 64)
    keys = values = torch.randn(2, 1, 2, 8, 64)
    with caplog.at_level(logging.INFO, logger="specfast.kernels"):
        out = ttt_attention(q, keys, values)
        ttt_attention(q, keys, values)
    torch.testing.assert_close(out, ttt_attention(q, keys, values, backend="torch"))
    said = [r.getMessage() for r in caplog.records if "ttt_attention" in r.getMessage()]
    assert len(said) == 1 and "torch path on cpu" in said[0]  # once, not per call


# Compiles the three kernels for an H100 (sm_90) with the ptxas that ships in the Triton wheel, no
# GPU needed, as the JIT would specialise them for contiguous 16-byte-aligned bf16 tensors, and
# reads the register spills and shared memory of each tile choice. Run in a subprocess: the kernels
# in this process were defined for the interpreter.
_COMPILE_FOR_SM90 = r"""
import importlib, json, os, subprocess, tempfile, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
m = importlib.import_module("specfast.kernels.ttt_attention")
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
kernels = {"fwd": m._ttt_fwd_kernel, "dq": m._ttt_bwd_dq_kernel, "dkdv": m._ttt_bwd_dkdv_kernel}
result = []
for D in (64, 128):
    for kind, fn in kernels.items():
        bm, bn, warps, stages = m._tiles(kind, torch.bfloat16, D, False)
        consts = dict(HAS_DOCS=True, UPCAST=False, DOT_PREC="tf32",
                      BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn)
        sig, attrs = {}, {}
        for i, n in enumerate(fn.arg_names):
            if n in consts or n.endswith("_d"):  # unit strides are specialised to 1 by the JIT
                consts.setdefault(n, 1)
                sig[n] = "constexpr"
            elif n in ("Q", "K", "V", "DO", "Out", "DQ", "DK", "DV",
                       "Lse", "Delta", "Start", "End"):
                sig[n] = {"Lse": "*fp32", "Delta": "*fp32",
                          "Start": "*i32", "End": "*i32"}.get(n, "*bf16")
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif n in ("scale", "scale_log2"):
                sig[n] = "fp32"
            else:
                sig[n] = "i32"
                # head dim and strides: multiples of 16
                if (n.startswith("s") and n != "S") or n == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"]); f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
        stack = int(usage.split("STACK:")[1].split()[0])
        result.append(dict(D=D, kind=kind, shared=k.metadata.shared, stack=stack))
print(json.dumps(result))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_without_heavy_spills():
    import json
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not os.path.exists(
        os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ):
        pytest.skip("this Triton wheel ships no ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for r in json.loads(res.stdout.strip().splitlines()[-1]):
        assert r["shared"] <= 99 * 1024, (
            r
        )  # fits every GPU since Ampere, not only the H100's 227 KiB
        assert r["stack"] <= 128, r  # a few spilled registers at most
