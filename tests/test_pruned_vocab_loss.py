"""The fused pruned-vocabulary head + loss and the chunked full-vocabulary argmax, held to their
references. The Triton kernel runs in the interpreter (conftest sets TRITON_INTERPRET=1) on CPU
tensors with small odd shapes; the chunked torch path runs natively with a small chunk so several
chunks and a remainder are exercised."""

import logging

import pytest
import torch
from specfast.kernels import (
    _dispatch,
    full_vocab_argmax,
    pruned_vocab_loss,
    pruned_vocab_loss_reference,
)

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


def _check(backend, dtype, hidden, weight, teacher, mask):
    teacher_before = teacher.clone()
    kw = dict(backend=backend, chunk_size=8) if backend == "torch" else dict(backend=backend)
    loss, correct, gh, gw = _run(pruned_vocab_loss, hidden, weight, teacher, mask, **kw)
    rloss, rcorrect, rgh, rgw = _run(pruned_vocab_loss_reference, hidden, weight, teacher, mask)
    assert torch.equal(teacher, teacher_before), "the caller's teacher logits were modified"
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, rloss, rtol=2e-5, atol=1e-6)
    assert correct.dtype == torch.bool and correct.shape == mask.shape
    clear = _clear_rows(hidden, weight)
    assert clear.any()
    assert torch.equal(correct[clear], rcorrect[clear])
    max_logit = max(
        (hidden.float() @ weight.float().t()).abs().max().item(), teacher.float().abs().max().item()
    )
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


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grad_to_hidden_only_and_none_to_teacher(seed, backend):
    hidden, weight, teacher, mask = _inputs(21, 25, 99, torch.float32, "mixed_mask")
    h = hidden.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    loss, _ = pruned_vocab_loss(h, weight, t, mask, backend=backend)
    (3.0 * loss).backward()  # a non-unit upstream grad must scale the result
    hr = hidden.clone().requires_grad_()
    rloss, _ = pruned_vocab_loss_reference(hr, weight, teacher, mask)
    (3.0 * rloss).backward()
    assert t.grad is None
    _assert_grad_close(h.grad, hr.grad, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nothing_of_size_T_by_V_kept_for_backward(seed, backend):
    """Apart from the caller's own teacher tensor, no saved tensor may hold T·V elements. The same
    probe on the reference must find one, or the probe is broken."""
    T, H, V = 33, 17, 97
    hidden, weight, teacher, mask = _inputs(T, H, V, torch.float32, "mixed_mask")

    def biggest_saved(fn, **kw):
        sizes = []

        def pack(x):
            if x.untyped_storage().data_ptr() != teacher.untyped_storage().data_ptr():
                sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(
                hidden.clone().requires_grad_(),
                weight.clone().requires_grad_(),
                teacher,
                mask,
                **kw,
            )
        return max(sizes)

    assert biggest_saved(pruned_vocab_loss_reference) >= T * V
    assert biggest_saved(pruned_vocab_loss, backend=backend) <= max(T * H, V * H)


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


# --------------------------------------------------------------------------------------------------
# full_vocab_argmax
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_full_vocab_argmax_matches_dense(seed, chunk_size):
    T, H, V = _odd(11, 61), _odd(9, 41), _odd(101, 301)
    hidden, weight = torch.randn(T, H), torch.randn(V, H)
    z = hidden @ weight.t()
    out = full_vocab_argmax(hidden, weight, chunk_size=chunk_size)
    assert out.dtype == torch.int64 and out.shape == (T,)
    top2 = z.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * (1 + top2[:, 0].abs())
    assert torch.equal(out[clear], z.argmax(-1)[clear])
    # where near-ties make the order noise-dependent, the pick must still be a maximal logit
    assert torch.allclose(z.gather(1, out[:, None])[:, 0], top2[:, 0], rtol=1e-5, atol=1e-5)


def test_full_vocab_argmax_ties_and_low_precision(seed):
    T, H = 37, 4
    hidden = torch.randint(-1, 2, (T, H)).to(torch.bfloat16)
    half = torch.randint(-1, 2, (101, H))
    weight = torch.cat([half, half]).to(torch.bfloat16)  # every logit appears twice: every row ties
    z = hidden.float() @ weight.float().t()  # exact: small integers
    assert ((z == z.max(-1, keepdim=True).values).sum(-1) > 1).all(), "every row must contain a tie"
    assert torch.equal(full_vocab_argmax(hidden, weight, chunk_size=6), z.argmax(-1))
