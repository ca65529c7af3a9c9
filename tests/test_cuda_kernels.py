"""The Triton kernels as the GPU runs them (compiled, not interpreted), held to the plain-PyTorch
references on CUDA tensors: fresh random inputs of odd sizes, masks and packed documents, forward
and every gradient, in fp32, fp16 and bf16 (the interpreter cannot check bf16), and one whole TTT
training step with the kernels against the same step on the references.

Skipped where there is no CUDA device or under TRITON_INTERPRET=1 (CI runs on CPUs). On a GPU:
    TRITON_INTERPRET=0 python -m pytest tests/test_cuda_kernels.py

Error measure: ‖fast − ref‖ / ‖ref‖ over the whole tensor, the reference computed in fp32 from the
same (rounded) inputs. Bounds: fp32 inputs 5e-3 (Triton's fp32 dots run as tf32, ~3e-4), fp16 1e-2
and bf16 2e-2 (outputs and gradients rounded to 8 or 11 bits). A wrong index or a missed tile gives
errors of order 1, far above these.
"""

import os

import pytest
import torch
from specfast.kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    pruned_vocab_loss,
    pruned_vocab_loss_reference,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_reference,
    swiglu,
    swiglu_reference,
    ttt_attention,
    ttt_attention_reference,
)
from test_ttt_attention import random_doc_ids as cpu_random_doc_ids

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1",
    reason="needs a CUDA device and compiled Triton (TRITON_INTERPRET=0)",
)

DEV = "cuda"
REL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the fast path's output"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_close_rel(got, want, dtype, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err < REL[dtype], f"{what}: relative error {err:.2e} ≥ {REL[dtype]:.0e}"


def grads(outs, inputs, ups):
    return torch.autograd.grad(outs, inputs, ups)


# --------------------------------------------------------------------------------------------------
# pruned-vocabulary head + loss
# --------------------------------------------------------------------------------------------------
# (T, H, V, teacher form): odd sizes off every tile edge, the SmolLM2 draft's (576, 16k) at a
# training row's length, and a teacher given as logits (strided view) or as hidden state.
LOSS_CASES = [
    (37, 72, 1001, "logits"),
    (517, 200, 3001, "hidden"),
    (2049, 576, 16384, "hidden"),
    (1500, 576, 8192, "logits"),
]


def loss_inputs(T, H, V, form, dtype):
    hidden = torch.randn(T, H, device=DEV).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEV) * H**-0.5).to(dtype).requires_grad_()
    mask = torch.rand(T, device=DEV) < 0.8
    if form == "logits":  # a view into a wider buffer, as the trainer's per-step slices are
        wide = torch.randn(T, V + 7, device=DEV) * 3
        return hidden, weight, mask, dict(teacher_logits=wide[:, 3 : 3 + V])
    Ht = H + 16
    return (
        hidden,
        weight,
        mask,
        dict(
            teacher_hidden=torch.randn(T, Ht, device=DEV).to(dtype),
            teacher_weight=(torch.randn(V, Ht, device=DEV) * 2 * Ht**-0.5).to(dtype),
        ),
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,V,form", LOSS_CASES)
def test_pruned_vocab_loss(seed, T, H, V, form, dtype, backend):
    """The Triton kernel, and the chunked path on cuBLAS (16-bit matmuls for 16-bit inputs, the
    teacher's in exact TF32)."""
    hidden, weight, mask, teacher = loss_inputs(T, H, V, form, dtype)
    loss, correct = pruned_vocab_loss(hidden, weight, mask=mask, backend=backend, **teacher)
    ref, ref_correct = pruned_vocab_loss_reference(hidden, weight, mask=mask, **teacher)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_rel(loss, ref, dtype, "loss")
    # argmax ties under rounding may flip a few positions; a wrong row or column flips many
    agree = float((correct == ref_correct).float().mean())
    assert agree > 0.98, f"correct agrees with the reference on {agree:.1%} of positions"
    got = grads(loss, (hidden, weight), None)
    want = grads(ref, (hidden, weight), None)
    for name, a, b in zip(["grad hidden", "grad weight"], got, want):
        assert a.dtype == dtype, name
        assert_close_rel(a, b, dtype, name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pruned_vocab_loss_all_masked(seed, backend):
    hidden, weight, _, teacher = loss_inputs(133, 64, 515, "hidden", torch.bfloat16)
    mask = torch.zeros(133, dtype=torch.bool, device=DEV)
    loss, _ = pruned_vocab_loss(hidden, weight, mask=mask, backend=backend, **teacher)
    dh, dw = grads(loss, (hidden, weight), None)
    assert float(loss.detach()) == 0.0 and not dh.any() and not dw.any()


def test_pruned_vocab_loss_auto_on_cuda_is_the_chunked_path_and_leaves_tf32_alone(seed):
    from specfast.kernels import _dispatch

    hidden, weight, mask, teacher = loss_inputs(133, 64, 515, "hidden", torch.bfloat16)
    before = torch.backends.cuda.matmul.allow_tf32
    _dispatch._said.discard("pruned_vocab_loss:torch:cuda")
    got = pruned_vocab_loss(hidden, weight, mask=mask, **teacher)[0]
    assert "pruned_vocab_loss:torch:cuda" in _dispatch._said
    assert torch.backends.cuda.matmul.allow_tf32 == before
    want = pruned_vocab_loss(hidden, weight, mask=mask, backend="torch", **teacher)[0]
    assert float(got.detach()) == float(want.detach())


# --------------------------------------------------------------------------------------------------
# TTT attention
# --------------------------------------------------------------------------------------------------
def random_doc_ids(B, L, n_docs):
    return cpu_random_doc_ids(B, L, n_docs).to(DEV)


# (S, B, Hq, Hkv, L, D, documents): SmolLM2's heads (9/3, 64) and Llama-3-8B's (32/8, 128), L off
# the tiles, one document, several, and a step count (S=3) short of a full unroll.
ATTN_CASES = [
    (1, 2, 9, 3, 77, 64, 3),
    (3, 2, 9, 3, 333, 64, 0),
    (7, 1, 9, 3, 1029, 64, 5),
    (7, 1, 32, 8, 517, 128, 4),
    (2, 2, 4, 4, 250, 128, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,B,Hq,Hkv,L,D,n_docs", ATTN_CASES)
def test_ttt_attention(seed, S, B, Hq, Hkv, L, D, n_docs, dtype):
    # q in a projection's layout; keys and values as the first S steps of a preallocated buffer
    q = torch.randn(B, L, Hq, D, device=DEV, dtype=dtype).transpose(1, 2).requires_grad_()
    kbuf = torch.randn(S + 2, B, Hkv, L, D, device=DEV, dtype=dtype)
    vbuf = torch.randn(S + 2, B, Hkv, L, D, device=DEV, dtype=dtype)
    keys, values = kbuf[:S].requires_grad_(), vbuf[:S].requires_grad_()
    doc_ids = random_doc_ids(B, L, n_docs) if n_docs else None

    out = ttt_attention(q, keys, values, doc_ids, backend="triton")
    ref = ttt_attention_reference(q, keys, values, doc_ids)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype, "out")
    up = torch.randn_like(ref)
    got = grads(out, (q, keys, values), up)
    want = grads(ref, (q, keys, values), up)
    for name, a, b in zip(["dq", "dkeys", "dvalues"], got, want):
        assert_close_rel(a, b, dtype, name)


# --------------------------------------------------------------------------------------------------
# the per-step elementwise chain
# --------------------------------------------------------------------------------------------------
NORM_SHAPES = [(3, 1, 130), (2, 1037, 576), (1, 77, 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_rms_norm_and_add_rms_norm(seed, shape, dtype):
    H = shape[-1]
    wide = torch.randn(*shape[:-1], H + 9, device=DEV, dtype=dtype)
    x = wide[..., 4 : 4 + H].requires_grad_()  # strided rows
    residual = torch.randn(shape, device=DEV, dtype=dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(H, device=DEV)).requires_grad_()  # fp32 weight, as the trainer's

    out, ref = rms_norm(x, w, 1e-6, backend="triton"), rms_norm_reference(x, w, 1e-6)
    assert out.dtype == ref.dtype
    assert_close_rel(out, ref, dtype, "rms_norm")
    up = torch.randn_like(ref)
    for name, a, b in zip(["dx", "dw"], grads(out, (x, w), up), grads(ref, (x, w), up)):
        assert_close_rel(a, b, dtype, f"rms_norm {name}")

    outs = add_rms_norm(residual, x, w, 1e-6, backend="triton")
    refs = add_rms_norm_reference(residual, x, w, 1e-6)
    for name, a, b in zip(["h", "y"], outs, refs):
        assert a.dtype == b.dtype, name
        assert_close_rel(a, b, dtype, f"add_rms_norm {name}")
    ups = [torch.randn_like(r) for r in refs]
    inputs = (residual, x, w)
    for name, a, b in zip(
        ["dresidual", "dx", "dw"], grads(outs, inputs, ups), grads(refs, inputs, ups)
    ):
        assert_close_rel(a, b, dtype, f"add_rms_norm {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,heads,D", [(2, 37, 9, 64), (1, 1031, 8, 128), (2, 5, 3, 34)])
def test_rope(seed, B, T, heads, D, dtype):
    x = torch.randn(B, T, heads, D, device=DEV, dtype=dtype).transpose(1, 2).requires_grad_()
    positions = torch.randint(0, 8192, (B, T), device=DEV)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    offset, scaling = int(torch.randint(0, 8, ())), float(torch.empty(()).uniform_(0.8, 1.4))
    out = rope(x, positions, inv_freq, scaling, offset, backend="triton")
    ref = rope_reference(x, positions, inv_freq, scaling, offset)
    assert out.dtype == dtype and out.stride() == x.stride()
    assert_close_rel(out, ref, dtype, "rope")
    up = torch.randn_like(ref)
    assert_close_rel(grads(out, x, up)[0], grads(ref, x, up)[0], dtype, "rope dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,width", [(2, 1, 130), (1, 1037, 1536), (2, 77, 14336)])
def test_swiglu(seed, B, T, width, dtype):
    gate_up = (torch.randn(B, T, 2 * width, device=DEV) * 4).to(dtype).requires_grad_()
    gate, up = gate_up[..., :width], gate_up[..., width:]  # halves of one fused projection
    out, ref = swiglu(gate, up, backend="triton"), swiglu_reference(gate, up)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype, "swiglu")
    g = torch.randn_like(ref)
    assert_close_rel(grads(out, gate_up, g)[0], grads(ref, gate_up, g)[0], dtype, "swiglu grad")


# --------------------------------------------------------------------------------------------------
# one whole training step: every kernel in place, against the same step on the references
# --------------------------------------------------------------------------------------------------
def _draft_and_batch(T, dtype_teacher):
    from specfast.model import DraftConfig, Eagle3Draft
    from specfast.ttt import PackedBatch

    cfg = DraftConfig(
        hidden_size=576, target_hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, intermediate_size=1536, vocab_size=49152, draft_vocab_size=8192,
        aux_layer_ids=[1, 14, 26], rope_theta=100000.0,
    )  # fmt: skip
    draft = Eagle3Draft(cfg)
    draft.set_vocab(torch.randperm(cfg.vocab_size)[: cfg.draft_vocab_size].sort().values)
    draft.attach_target(torch.randn(cfg.vocab_size, cfg.hidden_size) * 0.05)
    draft.to(DEV)
    doc_ids = random_doc_ids(1, T, 3)[0]
    starts = torch.ones(T, dtype=torch.bool, device=DEV)
    starts[1:] = doc_ids[1:] != doc_ids[:-1]
    idx = torch.arange(T, device=DEV)
    first = torch.cummax(torch.where(starts, idx, 0), 0).values
    batch = PackedBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (T,), device=DEV),
        doc_ids=doc_ids,
        positions=idx - first,
        loss_mask=torch.rand(T, device=DEV) < 0.75,
        aux_hidden=torch.randn(T, 3 * 576, device=DEV) * 3,
        target_in_vocab=torch.rand(T, device=DEV) < 0.93,
        teacher_hidden=torch.randn(T, 576, device=DEV).to(dtype_teacher),
        teacher_weight=(torch.randn(8192, 576, device=DEV) * 0.1).to(dtype_teacher),
    )
    return draft, batch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_whole_ttt_step_matches_the_references(seed, monkeypatch, precision):
    """ttt_unroll with the Triton kernels (SPECFAST_KERNELS unset: auto) against the same unroll on
    every op's reference (SPECFAST_KERNELS=reference): loss, accuracy and every weight's gradient,
    under the trainer's bf16 autocast too."""
    from specfast.ttt import ttt_unroll

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    draft, batch = _draft_and_batch(1531, dtype)
    named = [(n, p) for n, p in draft.named_parameters() if p.requires_grad]

    def step(kernels):
        monkeypatch.setenv("SPECFAST_KERNELS", kernels)
        draft.zero_grad(set_to_none=True)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=precision == "bf16"):
            res = ttt_unroll(draft, batch, 4)
        res.loss.backward()
        return res, [p.grad.clone() for _, p in named]

    fast, fast_grads = step("auto")
    ref, ref_grads = step("reference")
    tol = 3 * REL[dtype]  # four steps of rounding stacked
    err = rel_err(fast.loss, ref.loss)
    assert err < tol, f"loss: relative error {err:.2e} ≥ {tol:.0e}"
    agree = float((fast.correct == ref.correct).float().mean())
    assert agree > 0.98, f"accuracy masks agree on {agree:.1%} of positions"
    for (name, _), a, b in zip(named, fast_grads, ref_grads):
        err = rel_err(a, b)
        assert err < tol, f"grad of {name}: relative error {err:.2e} ≥ {tol:.0e}"
