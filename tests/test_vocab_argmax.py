"""The target's full-vocabulary argmax: `full_vocab_argmax` against the dense argmax, and
`SplitVocabArgmax` (the same argmax plus the logits of kept columns, exact or screened in bf16)
against `full_vocab_argmax`, on random odd shapes, ties and near-ties below bf16's resolution; and
the online pipeline's fused teacher against the teacher formed from the final hidden state."""

import pytest
import torch
from specfast.kernels import SplitVocabArgmax, full_vocab_argmax


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _odd(lo, hi):
    return int(torch.randint(lo // 2, hi // 2, ()).item()) * 2 + 1


def _assert_argmax(out, z):
    """`out` is z's argmax where the top two logits are clearly apart, and a maximal logit where
    near-ties make the order depend on float rounding."""
    assert out.dtype == torch.int64 and out.shape == z.shape[:1]
    top2 = z.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * (1 + top2[:, 0].abs())
    assert torch.equal(out[clear], z.argmax(-1)[clear])
    assert torch.allclose(z.gather(1, out[:, None])[:, 0], top2[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_full_vocab_argmax_matches_dense(seed, chunk_size):
    T, H, V = _odd(11, 61), _odd(9, 41), _odd(101, 301)
    hidden, weight = torch.randn(T, H), torch.randn(V, H)
    _assert_argmax(full_vocab_argmax(hidden, weight, chunk_size=chunk_size), hidden @ weight.t())


def test_full_vocab_argmax_ties_and_low_precision(seed):
    T, H = 37, 4
    hidden = torch.randint(-1, 2, (T, H)).to(torch.bfloat16)
    half = torch.randint(-1, 2, (101, H))
    weight = torch.cat([half, half]).to(torch.bfloat16)  # every logit appears twice: every row ties
    z = hidden.float() @ weight.float().t()  # exact: small integers
    assert ((z == z.max(-1, keepdim=True).values).sum(-1) > 1).all(), "every row must contain a tie"
    assert torch.equal(full_vocab_argmax(hidden, weight, chunk_size=6), z.argmax(-1))


SCREENS = [None, torch.bfloat16]


@pytest.mark.parametrize("screen", SCREENS, ids=["exact", "bf16-screened"])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("kept", ["some", "none", "all"])
def test_split_argmax_and_kept_logits_match_the_definition(seed, screen, chunk_size, kept):
    T, H, V = _odd(11, 61), _odd(9, 41), _odd(101, 301)
    # large hidden norms and uneven weight-row norms: the screen's bound must hold for both
    hidden = torch.randn(T, H) * 30
    weight = torch.randn(V, H) * torch.rand(V, 1) * 3
    K = {"some": int(torch.randint(1, V, ())), "none": 0, "all": V}[kept]
    keep = torch.randperm(V)[:K].sort().values
    argmax, logits = SplitVocabArgmax(weight, keep, screen, chunk_size=chunk_size)(hidden)
    z = hidden @ weight.t()
    _assert_argmax(argmax, z)
    assert logits.dtype == torch.float32 and logits.shape == (T, K)
    # fp32 sums in another order: compare relative to the largest logit
    torch.testing.assert_close(logits, z[:, keep], rtol=0, atol=1e-5 * float(z.abs().max()))


@pytest.mark.parametrize("screen", SCREENS, ids=["exact", "bf16-screened"])
def test_split_argmax_ties_go_to_the_lowest_id(seed, screen):
    # small integers: every logit exact, and every value appears at three ids
    T, H = 37, 4
    hidden = torch.randint(-1, 2, (T, H)).float()
    third = torch.randint(-1, 2, (67, H)).float()
    weight = torch.cat([third, third, third])
    z = hidden @ weight.t()
    assert ((z == z.max(-1, keepdim=True).values).sum(-1) > 1).all(), "every row must contain a tie"
    # kept ids on either side of their duplicates: a tie is split between kept and other columns
    keep = torch.randperm(weight.shape[0])[: weight.shape[0] // 2].sort().values
    argmax, _ = SplitVocabArgmax(weight, keep, screen, chunk_size=5)(hidden)
    assert torch.equal(argmax, z.argmax(-1))


def test_screen_is_exact_where_bf16_cannot_tell_columns_apart(seed):
    H = 64
    hidden = torch.randn(5, H) * 10
    # the row's best column: entries of magnitude 0.5-1 with the row's signs, exact in bf16
    # (spacing 2^-8 there, far above the 1e-4 below)
    kept_col = ((torch.rand(H) * 0.5 + 0.5) * hidden[0].sign()).bfloat16().float()
    # an other column above the kept one by much less than bf16's resolution of the logit
    other_col = kept_col + 1e-4 * hidden[0].sign()
    assert torch.equal(kept_col.bfloat16(), other_col.bfloat16()), "bf16 must not see the gap"
    weight = torch.cat([torch.randn(10, H) * 0.01, kept_col[None], other_col[None]])  # ids 10, 11
    argmax, _ = SplitVocabArgmax(weight, torch.tensor([10]), torch.bfloat16)(hidden[:1])
    assert int(argmax) == 11 == int((hidden[:1] @ weight.t()).argmax())


def test_bad_kept_ids_are_refused():
    weight = torch.randn(20, 4)
    for keep in (torch.tensor([3, 2]), torch.tensor([1, 1]), torch.tensor([5, 20])):
        with pytest.raises(ValueError, match="keep_ids"):
            SplitVocabArgmax(weight, keep)
    with pytest.raises(ValueError, match="keep_weight"):
        SplitVocabArgmax(weight, torch.tensor([1, 2]), keep_weight=torch.randn(3, 4))


@pytest.mark.parametrize("fused", [True, False])
def test_online_batches_carry_the_same_teacher_fused_or_not(tiny_prepared, tiny_target_dir, fused):
    from specfast.data.prepared import PreparedData
    from specfast.pipeline import assemble_batch, open_online, teacher_rows
    from specfast.targets import load_target

    cpu = torch.device("cpu")
    data = PreparedData.load(tiny_prepared)
    target = load_target(str(tiny_target_dir), device="cpu")
    batches = open_online(data, target, 160, seed=0, device=cpu, fused_teacher=fused)
    W = target.lm_head_weight().float()
    for _ in range(3):
        raw = batches.next_raw()
        batch = assemble_batch(raw, target, data.vocab, cpu, batches.teacher_weight)
        assert (batch.teacher_logits is not None) == fused
        rows = teacher_rows(batch.loss_mask, batch.doc_ids)
        final = raw["final_hidden"].float()[rows]
        assert torch.equal(raw["target_argmax"][rows], full_vocab_argmax(final, W))
        assert (raw["target_argmax"][~rows] == -1).all()
        expected = final @ W[data.vocab.draft_ids].t()
        torch.testing.assert_close(batch.teacher_rows(rows.nonzero()[:, 0]), expected)


@pytest.mark.parametrize("screen", [None, torch.bfloat16])
def test_kept_logits_are_the_kept_columns_of_the_full_pass(screen):
    V, H, T = 300, 24, 37
    weight, hidden = torch.randn(V, H), torch.randn(T, H)
    keep = torch.randperm(V)[:50].sort().values
    split = SplitVocabArgmax(weight, keep, screen, chunk_size=64)
    _, kept = split(hidden)
    torch.testing.assert_close(split.kept_logits(hidden), kept, rtol=1e-5, atol=1e-5)
