"""The fused pruned-vocabulary head + loss, held to its reference. The Triton kernel runs in the
interpreter (conftest sets TRITON_INTERPRET=1) on CPU tensors with small odd shapes; the chunked
torch path runs natively with a small chunk so several chunks and a remainder are exercised, with
every chunk's grad_logits kept from the forward, with none kept (recomputed in the backward) and
with a budget that keeps only some. The teacher comes as logits or as hidden state + lm_head
rows."""

import logging
import math

import pytest
import torch
from specfast.kernels import (
    _dispatch,
    pruned_vocab_loss,
    pruned_vocab_loss_reference,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: one intra-op thread. With two, every small op waits at an OpenMP
    barrier, which on a loaded shared machine multiplied this file's time by ~3."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# grads are returned in the input dtype: compare at that dtype's rounding (relative to the largest
# entry)
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
BACKENDS = [
    ("triton", torch.float32),
    ("triton", torch.float16),
    ("torch", torch.float32),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
]


def _odd(lo, hi):
    return int(torch.randint(lo // 2, hi // 2, ()).item()) * 2 + 1


def _inputs(T, H, V, dtype, case):
    """hidden, weight, teacher (a view of a bigger tensor when case == 'strided'), mask."""
    scale = 50.0 if case == "large" else 1.0
    hidden = (torch.randn(T, H) * scale).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    if case == "strided":
        # the TTT loop passes shifted slices of one tensor; also skip every other row and pad
        # columns
        base = (torch.randn(2 * T + 7, V + 5) * 3).to(dtype)
        teacher = base[3 : 3 + 2 * T : 2, 2 : 2 + V]
        assert not teacher.is_contiguous()
    elif case == "transposed":  # a column stride other than 1
        teacher = (torch.randn(V, T) * 3).to(dtype).t()
    else:
        teacher = (torch.randn(T, V) * 3 * scale).to(dtype)
    if case == "all_rows":
        mask = torch.ones(T, dtype=torch.bool)
    else:
        mask = torch.rand(T) < 0.6
        mask[0], mask[-1] = True, False  # at least one supervised and one unsupervised row
    return hidden, weight, teacher, mask


def _run(fn, hidden, weight, teacher, mask, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, correct = fn(h, w, teacher, mask, **kw)
    loss.backward()
    return loss.detach(), correct, h.grad, w.grad


def _assert_grad_close(actual, expected, dtype, max_logit=0.0):
    """fp32 rounding of a logit of size |z| moves exp(z − lse) by ~|z|·2⁻²⁴ relative, so large
    logits (the ×50 case) loosen the tolerance in proportion."""
    assert actual.dtype == expected.dtype == dtype
    rel = GRAD_TOL[dtype] + 4 * max_logit * 2.0**-24
    tol = rel * max(expected.float().abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol)


def _clear_rows(hidden, weight):
    """Rows whose draft top-2 logits differ by more than summation-order noise: there the argmax of
    any correct implementation must agree with the reference's."""
    z = hidden.float() @ weight.float().t()
    top2 = z.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]) > 1e-4 * (1 + top2[:, 0].abs())


CHUNK = 8  # rows per chunk of the torch path in these tests: several chunks and a remainder


def _keeps(V):
    """keep_bytes values the torch path is held to the reference with: the default (every chunk
    of these small shapes fits), none (all recomputed) and two chunks' worth (some of each)."""
    return {"kept": None, "recompute": 0, "partial": 2 * CHUNK * V * 4}


def _check(backend, dtype, hidden, weight, teacher, mask, **teacher_kw):
    """The fast path against the reference, for every keep budget of the torch path. The teacher
    is `teacher` (logits) or teacher_kw (teacher_hidden, teacher_weight); the reference gets the
    latter materialised, as the definition says."""
    if teacher is None:
        th, tw = teacher_kw["teacher_hidden"], teacher_kw["teacher_weight"]
        ref_teacher = th.detach().float() @ tw.detach().float().t()
    else:
        ref_teacher = teacher
    teacher_before = ref_teacher.clone()
    rloss, rcorrect, rgh, rgw = _run(pruned_vocab_loss_reference, hidden, weight, ref_teacher, mask)
    clear = _clear_rows(hidden, weight)
    assert clear.any()
    max_logit = max(
        (hidden.float() @ weight.float().t()).abs().max().item(),
        ref_teacher.float().abs().max().item(),
    )
    V = weight.shape[0]
    keeps = _keeps(V) if backend == "torch" else {"-": None}
    for keep in keeps.values():
        kw = dict(backend=backend, keep_bytes=keep, **teacher_kw)
        if backend == "torch":
            kw["chunk_size"] = CHUNK
        loss, correct, gh, gw = _run(pruned_vocab_loss, hidden, weight, teacher, mask, **kw)
        if teacher is not None:
            assert torch.equal(teacher, teacher_before), "the caller's teacher logits were modified"
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss, rloss, rtol=2e-5, atol=1e-6)
        assert correct.dtype == torch.bool and correct.shape == mask.shape
        assert torch.equal(correct[clear], rcorrect[clear])
        _assert_grad_close(gh, rgh, dtype, max_logit)
        _assert_grad_close(gw, rgw, dtype, max_logit)


@pytest.mark.parametrize("case", ["mixed_mask", "all_rows", "large", "strided", "transposed"])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_matches_reference(seed, backend, dtype, case):
    T, H, V = _odd(17, 41), _odd(17, 71), _odd(97, 229)  # never multiples of the blocks
    _check(backend, dtype, *_inputs(T, H, V, dtype, case))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_teacher_masked_with_minus_inf(seed, backend):
    """A teacher that rules tokens out with −inf, over whole leading tiles of some rows."""
    hidden, weight, teacher, mask = _inputs(21, 19, 131, torch.float32, "mixed_mask")
    teacher[::2, :70] = float("-inf")
    teacher[1::3, 5::7] = float("-inf")
    _check(backend, torch.float32, hidden, weight, teacher, mask)


def test_triton_many_row_blocks(seed):
    """More row blocks than one backward program group (8 × 16 rows under the interpreter), with
    a partial last group and a partial last block."""
    T, H, V = _odd(131, 171), _odd(17, 33), _odd(33, 63)
    _check("triton", torch.float32, *_inputs(T, H, V, torch.float32, "mixed_mask"))


@pytest.mark.parametrize("backend,dtype", BACKENDS[:3])
def test_all_masked_batch(seed, backend, dtype):
    hidden, weight, teacher, _ = _inputs(19, 33, 101, dtype, "mixed_mask")
    mask = torch.zeros(19, dtype=torch.bool)
    loss, correct, gh, gw = _run(pruned_vocab_loss, hidden, weight, teacher, mask, backend=backend)
    _, rcorrect, _, _ = _run(pruned_vocab_loss_reference, hidden, weight, teacher, mask)
    assert loss.item() == 0.0
    assert not gh.any() and not gw.any()
    clear = _clear_rows(hidden, weight)
    assert torch.equal(correct[clear], rcorrect[clear])  # accuracy is reported for every row


def _first_and_last_argmax(x):
    first = x.argmax(-1)
    last = x.shape[-1] - 1 - x.flip(-1).argmax(-1)
    return first, last


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ties_go_to_lowest_index(seed, backend):
    """Small integers make every logit exact, so ties are real (within a tile, across tiles and
    across the forward's V splits). Even rows: the teacher's only maximum sits at the draft's *last*
    maximal index, so `correct` is False unless the draft argmax wrongly picks the last tie. Odd
    rows: the teacher ties every index from the draft's first maximal one to the end (across tiles
    and splits), so `correct` is True unless the teacher argmax wrongly picks a later tie."""
    T, H, V = 24, 3, 131
    hidden = torch.randint(-1, 2, (T, H)).float()
    weight = torch.randint(-1, 2, (V, H)).float()
    z = hidden @ weight.t()
    first, last = _first_and_last_argmax(z)
    teacher = torch.zeros(T, V)
    teacher[torch.arange(0, T, 2), last[0::2]] = 1.0
    teacher[1::2] = (torch.arange(V)[None, :] >= first[1::2, None]).float()  # ties first..V-1
    mask = torch.rand(T) < 0.7

    loss, correct, gh, gw = _run(
        pruned_vocab_loss, hidden, weight, teacher, mask, backend=backend, chunk_size=5
    )
    rloss, rcorrect, rgh, rgw = _run(pruned_vocab_loss_reference, hidden, weight, teacher, mask)
    # the construction must make both tie-breaking rules matter, or this test proves nothing
    t_first, t_last = _first_and_last_argmax(teacher)
    assert (rcorrect != (last == t_first)).any() and (rcorrect != (first == t_last)).any()
    assert torch.equal(correct, rcorrect)
    torch.testing.assert_close(loss, rloss, rtol=2e-5, atol=1e-6)
    _assert_grad_close(gh, rgh, torch.float32)
    _assert_grad_close(gw, rgw, torch.float32)


@pytest.mark.parametrize("backend,keep", [("triton", None), ("torch", None), ("torch", 0)])
def test_grad_to_hidden_only_and_none_to_teacher(seed, backend, keep):
    hidden, weight, teacher, mask = _inputs(21, 25, 99, torch.float32, "mixed_mask")
    h = hidden.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    loss, _ = pruned_vocab_loss(h, weight, t, mask, backend=backend, keep_bytes=keep)
    (3.0 * loss).backward()  # a non-unit upstream grad must scale the result
    hr = hidden.clone().requires_grad_()
    rloss, _ = pruned_vocab_loss_reference(hr, weight, teacher, mask)
    (3.0 * rloss).backward()
    assert t.grad is None
    _assert_grad_close(h.grad, hr.grad, torch.float32)


def _saved(fn, hidden, weight, teacher, mask, **kw):
    """The tensors autograd saves for fn's backward, as (shape, nbytes) per tensor, leaving out
    the caller's own teacher logits (saved by reference, not a copy)."""
    sizes = []
    skip = None if teacher is None else teacher.untyped_storage().data_ptr()

    def pack(x):
        if x.untyped_storage().data_ptr() != skip:
            sizes.append((tuple(x.shape), x.numel() * x.element_size()))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), teacher, mask, **kw)
    return sizes


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nothing_of_size_T_by_V_kept_for_backward(seed, backend):
    """With keep_bytes=0, apart from the caller's own teacher tensor, no saved tensor may hold T·V
    elements. The same probe on the reference must find one, or the probe is broken."""
    T, H, V = 33, 17, 97
    hidden, weight, teacher, mask = _inputs(T, H, V, torch.float32, "mixed_mask")

    def biggest(fn, **kw):
        return max(math.prod(s) for s, _ in _saved(fn, hidden, weight, teacher, mask, **kw))

    assert biggest(pruned_vocab_loss_reference) >= T * V
    assert biggest(pruned_vocab_loss, backend=backend, keep_bytes=0) <= max(T * H, V * H)


# --------------------------------------------------------------------------------------------------
# the teacher as hidden state + lm_head rows
# --------------------------------------------------------------------------------------------------


def _teacher_from_hidden(T, V, dtype, case, Ht=None):
    """teacher_hidden [T, H_t] (shifted rows of a bigger tensor unless case == 'contiguous', as
    the TTT loop passes them) and teacher_weight [V, H_t], with logits of spread ~3."""
    Ht = Ht or _odd(17, 71)
    if case == "contiguous":
        th = torch.randn(T, Ht).to(dtype)
    else:
        base = torch.randn(T + 9, Ht + 3).to(dtype)
        th = base[4 : 4 + T, :Ht]  # shifted rows, padded columns: row stride ≠ H_t
        assert not th.is_contiguous()
    tw = (torch.randn(V, Ht) * 3 / Ht**0.5).to(dtype)
    return th, tw


@pytest.mark.parametrize("case", ["contiguous", "shifted"])
@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_teacher_from_hidden_matches_reference(seed, backend, dtype, case):
    """Equal to the reference fed teacher_hidden.float() @ teacher_weight.float().T, for every
    keep budget; neither teacher tensor gets a grad."""
    T, H, V = _odd(17, 41), _odd(17, 71), _odd(97, 229)
    hidden, weight, _, mask = _inputs(T, H, V, dtype, "mixed_mask")
    th, tw = _teacher_from_hidden(T, V, dtype, case)
    th.requires_grad_(), tw.requires_grad_()
    _check(backend, dtype, hidden, weight, None, mask, teacher_hidden=th, teacher_weight=tw)
    assert th.grad is None and tw.grad is None


@pytest.mark.parametrize(
    "backend,dtype,teacher_dtype",
    [
        ("torch", torch.float32, torch.bfloat16),  # bf16 hidden states, as shards store them
        ("triton", torch.float32, torch.float16),  # the interpreter cannot do bf16 arithmetic
        ("triton", torch.float16, torch.float32),
    ],
)
def test_teacher_from_hidden_in_another_dtype(seed, backend, dtype, teacher_dtype):
    T, H, V = _odd(17, 41), _odd(17, 71), _odd(97, 229)
    hidden, weight, _, mask = _inputs(T, H, V, dtype, "mixed_mask")
    th, tw = _teacher_from_hidden(T, V, teacher_dtype, "shifted")
    _check(backend, dtype, hidden, weight, None, mask, teacher_hidden=th, teacher_weight=tw)


@pytest.mark.parametrize("keep", ["kept", "recompute"])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_bf16_matmuls_match_the_reference_on_rounded_operands(seed, keep, teacher_form):
    """mm_dtype=bf16 (fp32 weights, as --precision bf16 trains): the same math as the reference
    on bf16-rounded operands, up to the rounding of each matmul's output to bf16 (2⁻⁸ relative);
    softmaxes, sums and the fp32 teacher are untouched. Under CPU autocast it is the default."""
    T, H, V = _odd(17, 41), _odd(17, 71), _odd(97, 229)
    hidden, weight, teacher, mask = _inputs(T, H, V, torch.float32, "mixed_mask")
    kw = {}
    if teacher_form == "hidden":
        th, tw = _teacher_from_hidden(T, V, torch.float32, "shifted")
        kw, teacher = dict(teacher_hidden=th, teacher_weight=tw), th @ tw.t()
    rounded = hidden.bfloat16().float(), weight.bfloat16().float()
    rloss, rcorrect, rgh, rgw = _run(pruned_vocab_loss_reference, *rounded, teacher, mask)
    fast = dict(backend="torch", chunk_size=CHUNK, keep_bytes=_keeps(V)[keep], **kw)
    given = None if teacher_form == "hidden" else teacher
    loss, correct, gh, gw = _run(
        pruned_vocab_loss, hidden, weight, given, mask, mm_dtype=torch.bfloat16, **fast
    )
    assert loss.dtype == gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(loss, rloss, rtol=1e-2, atol=1e-3)
    for g, r in ((gh, rgh), (gw, rgw)):
        torch.testing.assert_close(g, r, rtol=0, atol=3e-2 * r.abs().max().item())
    z = rounded[0] @ rounded[1].t()
    top2 = z.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2e-2 * (1 + top2[:, 0].abs())
    assert torch.equal(correct[clear], rcorrect[clear])
    # fp32 in, autocast on: the same bf16 path, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _run(pruned_vocab_loss, hidden, weight, given, mask, **fast)
    for a, b in zip(auto, (loss, correct, gh, gw)):
        assert torch.equal(a, b)


def test_reference_entry_points_agree(seed):
    T, H, V = 23, 19, 101
    hidden, weight, _, mask = _inputs(T, H, V, torch.float32, "mixed_mask")
    th, tw = _teacher_from_hidden(T, V, torch.float32, "shifted")
    a = _run(pruned_vocab_loss_reference, hidden, weight, None, mask, teacher_hidden=th,
             teacher_weight=tw)  # fmt: skip
    b = _run(pruned_vocab_loss_reference, hidden, weight, th @ tw.t(), mask)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_teacher_arguments_are_checked():
    hidden, weight, teacher, mask = _inputs(9, 17, 33, torch.float32, "mixed_mask")
    th, tw = torch.randn(9, 5), torch.randn(33, 5)
    for fn in (pruned_vocab_loss, pruned_vocab_loss_reference):
        with pytest.raises(ValueError, match="not both and not neither"):
            fn(hidden, weight, None, mask)
        with pytest.raises(ValueError, match="not both and not neither"):
            fn(hidden, weight, teacher, mask, teacher_hidden=th, teacher_weight=tw)
        with pytest.raises(ValueError, match="go together"):
            fn(hidden, weight, mask=mask, teacher_hidden=th)
        with pytest.raises(ValueError, match="go together"):
            fn(hidden, weight, mask=mask, teacher_weight=tw)
        with pytest.raises(ValueError, match="teacher_hidden"):
            fn(hidden, weight, mask=mask, teacher_hidden=th[:8], teacher_weight=tw)
        with pytest.raises(ValueError, match="teacher_weight"):
            fn(hidden, weight, mask=mask, teacher_hidden=th, teacher_weight=tw[:, :4])
        with pytest.raises(TypeError, match="mask"):
            fn(hidden, weight, teacher)
    with pytest.raises(ValueError, match="keep_bytes"):
        pruned_vocab_loss(hidden, weight, teacher, mask, backend="torch", keep_bytes=-1)


# --------------------------------------------------------------------------------------------------
# what the forward keeps for the backward
# --------------------------------------------------------------------------------------------------


def _kept_blocks(sizes, V):
    """Saved tensors that are [rows, V] blocks (the kept grad_logits; H ≠ V in these tests): their
    bytes."""
    return [b for shape, b in sizes if len(shape) == 2 and shape[1] == V]


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_keep_budget_decides_which_chunks_are_kept(seed, teacher_form):
    """Whole supervised chunks are kept while they fit; unsupervised chunks never are; a call
    that keeps every chunk does not hold on to the teacher."""
    T, H, V = 6 * CHUNK + 3, 17, 97  # 7 chunks, the last one short
    hidden, weight, teacher, mask = _inputs(T, H, V, torch.float32, "all_rows")
    mask[CHUNK : 2 * CHUNK] = False  # chunk 1 is unsupervised
    if teacher_form == "hidden":
        th, tw = _teacher_from_hidden(T, V, torch.float32, "shifted")
        teacher, kw = None, dict(teacher_hidden=th, teacher_weight=tw)
    else:
        kw = {}
    block = CHUNK * V * 4

    def kept(keep):
        sizes = _saved(pruned_vocab_loss, hidden, weight, teacher, mask, backend="torch",
                       chunk_size=CHUNK, keep_bytes=keep, **kw)  # fmt: skip
        return _kept_blocks(sizes, V), sizes

    assert kept(0)[0] == []
    # chunks 0 and 2, then the short last chunk fits in the half block left
    assert kept(2 * block + block // 2)[0] == [block, block, 3 * V * 4]
    everything, sizes = kept(None)
    assert everything == [block] * 5 + [3 * V * 4]  # all but chunk 1; the last is short
    # nothing of the teacher is saved when no chunk is recomputed
    assert not [s for s, _ in sizes if len(s) == 2 and s[0] == T and s[1] != H], sizes


def test_kept_grads_survive_a_second_backward(seed):
    """The backward reads the kept blocks without changing them: a retained graph gives the
    same grads twice."""
    hidden, weight, teacher, mask = _inputs(29, 19, 101, torch.float32, "mixed_mask")
    h = hidden.clone().requires_grad_()
    loss, _ = pruned_vocab_loss(h, weight, teacher, mask, backend="torch", chunk_size=CHUNK)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first)


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_saved_memory_is_flat_in_T_beyond_the_budget(seed, backend, teacher_form):
    """Tripling T grows the saved tensors by O(T·(H + H_t)) only: with keep_bytes=0 nothing of
    size T·V is kept, and with a budget the kept blocks stop at the budget."""
    H, V = 17, 97
    budget = 3 * CHUNK * V * 4 if backend == "torch" else 0

    def saved_bytes(T, keep):
        hidden, weight, teacher, mask = _inputs(T, H, V, torch.float32, "all_rows")
        kw = dict(backend=backend, keep_bytes=keep)
        if backend == "torch":
            kw["chunk_size"] = CHUNK
        per_row = 4 * H + 1 + 8  # hidden, mask, and the Triton path's two per-row lse
        if teacher_form == "hidden":
            th, tw = _teacher_from_hidden(T, V, torch.float32, "contiguous", Ht=23)
            teacher, kw = None, dict(kw, teacher_hidden=th, teacher_weight=tw)
            per_row += 4 * th.shape[1]
        sizes = _saved(pruned_vocab_loss, hidden, weight, teacher, mask, **kw)
        return sum(b for _, b in sizes), sum(_kept_blocks(sizes, V)), per_row

    for keep in sorted({0, budget}):
        small, small_kept, _ = saved_bytes(4 * CHUNK, keep)
        big, big_kept, per_row = saved_bytes(12 * CHUNK, keep)
        assert big_kept <= keep and small_kept <= keep
        assert big - small <= 8 * CHUNK * per_row, (small, big)
        assert small_kept == big_kept == keep  # 0, or the whole budget (3 chunks) at both sizes


# Compiles both kernels for an H100 (sm_90) with the ptxas that ships in the Triton wheel, no GPU
# needed, for each teacher form and dtype, as the JIT would specialise them (16-byte-aligned
# pointers and strides, unit column strides), and reads shared memory and register spills. Run in
# a subprocess: the kernels in this process were defined for the interpreter.
_COMPILE_FOR_SM90 = r"""
import json, os, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import specfast.kernels.pruned_vocab_loss_triton as m
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TY = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
cuda = torch.device("cuda")
out = []
for dt in (torch.bfloat16, torch.float32):
    for teacher in ("logits", "hidden_bf16", "hidden_fp32"):
        tdt = torch.float32 if teacher == "hidden_fp32" else torch.bfloat16
        for kind, fn in (("fwd", m._fwd_kernel), ("bwd", m._bwd_kernel)):
            cfg = m._triton_config(cuda, dt)
            bt, bv, bh = cfg[kind]
            consts = dict(BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh,
                          BLOCK_HT=m._triton_config(cuda, tdt)[kind][2],
                          TEACHER_DOT=teacher != "logits", UPCAST=False, DOT_PRECISION="tf32",
                          T_DOT_PRECISION="tf32", GROUP_T=8, COMPUTE_DH=True, COMPUTE_DW=True,
                          stride_tv=1)
            sig, attrs = {}, {}
            for i, n in enumerate(fn.arg_names):
                if n in consts:
                    sig[n] = "constexpr"
                    continue
                if n.endswith("_ptr"):
                    sig[n] = (TY[dt] if n in ("h_ptr", "w_ptr")
                              else TY[tdt] if n in ("t_ptr", "tw_ptr")
                              else "*i32" if n.startswith("i_") else "*fp32")
                else:
                    sig[n] = "i32"
                if n.endswith("_ptr") or n.startswith("stride") or n in ("H", "HT"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()
                                        if k in fn.arg_names})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": cfg["num_warps"],
                                        "num_stages": cfg[kind + "_stages"]})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"]); f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                       capture_output=True, text=True).stdout
            stack = int(usage.split("STACK:")[1].split()[0])
            out.append(dict(dtype=str(dt), teacher=teacher, kind=kind, shared=k.metadata.shared,
                            stack=stack))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_within_limits():
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
        assert r["shared"] <= 164 * 1024, r  # the A100's limit (the H100 has 227 KiB)
        # the teacher-as-hidden kernels do not spill; the logits-teacher forward spills a few
        # hundred bytes (608 with Triton 3.9), a known cost of its [64, 128] strided tile load
        assert r["stack"] <= (1024 if r["teacher"] == "logits" else 128), r


def test_auto_dispatch_on_cpu_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(_dispatch, "_said", set())
    hidden, weight, teacher, mask = _inputs(9, 17, 33, torch.float32, "mixed_mask")
    with caplog.at_level(logging.INFO, logger="specfast.kernels"):
        for _ in range(2):
            pruned_vocab_loss(hidden, weight, teacher, mask)
    said = [r.getMessage() for r in caplog.records if "pruned_vocab_loss" in r.getMessage()]
    assert said == ["pruned_vocab_loss: chunked torch path on cpu"]


def test_unknown_backend_is_an_error():
    hidden, weight, teacher, mask = _inputs(9, 17, 33, torch.float32, "mixed_mask")
    with pytest.raises(ValueError):
        pruned_vocab_loss(hidden, weight, teacher, mask, backend="cuda")


def test_env_names_the_path_where_the_caller_says_auto(monkeypatch):
    """SPECFAST_KERNELS=reference runs every op's definition where the caller left backend="auto"
    (how a benchmark times a whole step on the references); an explicit backend still wins, and
    a bad value is an error that names the variable."""
    import sys

    from specfast.kernels import rms_norm, ttt_attention

    def module(name):  # the package exports functions named like their modules
        return sys.modules[f"specfast.kernels.{name}"]

    calls = []
    monkeypatch.setattr(
        module("pruned_vocab_loss"),
        "pruned_vocab_loss_reference",
        lambda *a, **kw: (
            calls.append("loss") or (torch.zeros(()), torch.zeros(9, dtype=torch.bool))
        ),
    )
    monkeypatch.setattr(
        module("ttt_attention"),
        "ttt_attention_reference",
        lambda q, *a, **kw: calls.append("attention") or q,
    )
    monkeypatch.setattr(
        module("rms_norm"), "rms_norm_reference", lambda x, *a: calls.append("rms_norm") or x
    )
    hidden, weight, teacher, mask = _inputs(9, 17, 33, torch.float32, "mixed_mask")
    q, kv = torch.randn(1, 2, 9, 8), torch.randn(2, 1, 2, 9, 8)
    x, w = torch.randn(2, 9, 8), torch.ones(8)

    monkeypatch.setenv("SPECFAST_KERNELS", "reference")
    pruned_vocab_loss(hidden, weight, teacher, mask)
    ttt_attention(q, kv, kv)
    rms_norm(x, w, 1e-6)
    assert calls == ["loss", "attention", "rms_norm"]
    pruned_vocab_loss(hidden, weight, teacher, mask, backend="torch")  # explicit: not overridden
    assert calls == ["loss", "attention", "rms_norm"]

    monkeypatch.setenv("SPECFAST_KERNELS", "fast")
    with pytest.raises(ValueError, match="SPECFAST_KERNELS='fast'"):
        pruned_vocab_loss(hidden, weight, teacher, mask)
