"""The batch plan (the only packer) and the pipeline's pieces: every eligible sample once per
epoch within the token budget, reproducible from a seed, resumable from a saved position, split
across ranks without changing the global sequence of batches."""

import numpy as np
import pytest
import torch

from specfast import _shardio
from specfast.data.plan import BatchPlan
from specfast.pipeline import doc_layout, supervised_within


def greedy_reference(lengths, batch_tokens, order):
    """Plain-Python definition: take samples in order while they fit (at least one per batch)."""
    out, cur, used = [], [], 0
    for i in order:
        n = min(int(lengths[i]), batch_tokens)
        if cur and used + n > batch_tokens:
            out.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += n
    return out + ([cur] if cur else [])


def refill_reference(lengths, batch_tokens, order, seed, epoch, window):
    """Plain-Python definition of the refill: each window of `order`, first-fit decreasing into
    bins of batch_tokens (longest first, ties in order), the bins in a seeded order."""
    out = []
    for w, start in enumerate(range(0, len(order), window)):
        part = [int(i) for i in order[start : start + window]]
        size = {i: min(int(lengths[i]), batch_tokens) for i in part}
        bins = []
        for i in sorted(part, key=lambda i: -size[i]):  # sorted() is stable
            for b in bins:
                if sum(size[j] for j in b) + size[i] <= batch_tokens:
                    b.append(i)
                    break
            else:
                bins.append([i])
        perm = _shardio.permutation(len(bins), seed ^ 0x9E3779B97F4A7C15, (epoch << 32) + w)
        out += [i for b in perm for i in bins[b]]
    return out


def test_plan_is_the_seeded_permutation_refilled_and_packed_greedily(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 80, size=197)  # some longer than the batch_tokens: cut to it
    eligible = np.sort(rng.choice(197, size=180, replace=False))  # windows of 64 and a remainder
    plan = BatchPlan(lengths, 64, seed=seed, eligible=eligible)
    for epoch in range(2):
        shuffled = eligible[_shardio.permutation(len(eligible), seed, epoch)]
        order = refill_reference(lengths, 64, shuffled, seed, epoch, 64)
        want = greedy_reference(lengths, 64, order)
        got = [plan.next().tolist() for _ in range(len(want))]
        assert got == want
        assert sorted(sum(got, [])) == eligible.tolist()
    assert plan.state_dict()["epoch"] == 1


def test_refill_fills_batches_fuller_than_plain_greedy(seed):
    """The point of the refill: batches near the budget and of nearly equal size (ShareGPT-like
    lengths, most far under the budget), so N ranks wait little for each other."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(5.5, 1.0, size=3000).astype(np.int64) + 1, 1024)
    plan = BatchPlan(lengths, 1024, seed=seed)
    refilled = [int(plan.lengths[plan.next()].sum()) for _ in range(200)]
    plain = greedy_reference(lengths, 1024, np.arange(3000)[_shardio.permutation(3000, seed, 0)])
    plain = [int(lengths[b].sum()) for b in plain[:200]]
    assert max(refilled) <= 1024
    assert np.mean(refilled) > 0.95 * 1024 > np.mean(plain)
    assert np.mean(refilled) / np.max(np.reshape(refilled, (-1, 2)), axis=1).mean() > 0.95


def test_unshuffled_plan_and_epoch_batches_from_any_sample(seed):
    lengths = np.random.default_rng(seed).integers(1, 30, size=40)
    plan = BatchPlan(lengths, 50, shuffle=False)
    assert [b.tolist() for b in plan.epoch_batches(0)] == greedy_reference(lengths, 50, range(40))
    # Capture resumes at any sample: packing restarts greedily there.
    assert [b.tolist() for b in plan.epoch_batches(0, 13)] == greedy_reference(
        lengths, 50, range(13, 40)
    )


def test_same_seed_same_batches_and_resume_from_position(seed):
    lengths = np.random.default_rng(seed).integers(1, 30, size=40)
    a = BatchPlan(lengths, 50, seed=7)
    first = [a.next().tolist() for _ in range(25)]  # crosses into a second epoch
    b = BatchPlan(lengths, 50, seed=7)
    for _ in range(11):
        b.next()
    c = BatchPlan(lengths, 50, seed=7)
    c.load_state_dict(b.state_dict())
    assert [c.next().tolist() for _ in range(14)] == first[11:]
    upcoming = c.upcoming()  # lookahead does not move the plan
    assert [next(upcoming).tolist() for _ in range(3)] == [c.next().tolist() for _ in range(3)]
    assert [BatchPlan(lengths, 50, seed=8).next().tolist() for _ in range(3)] != first[:3]
    with pytest.raises(ValueError, match="seed"):
        BatchPlan(lengths, 50, seed=8).load_state_dict(b.state_dict())


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_every_nth_batch_of_one_global_plan(seed, world):
    lengths = np.random.default_rng(seed).integers(1, 30, size=33)
    single = BatchPlan(lengths, 50, seed=seed)
    global_batches = [single.next().tolist() for _ in range(4 * world)]
    ranks = [BatchPlan(lengths, 50, seed=seed, rank=r, world_size=world) for r in range(world)]
    for step in range(4):
        for r, plan in enumerate(ranks):
            assert plan.next().tolist() == global_batches[step * world + r]
    # The position is global: a 1-rank run resumes where the N-rank run stopped.
    resumed = BatchPlan(lengths, 50, seed=seed)
    resumed.load_state_dict(ranks[0].state_dict())
    assert resumed.state_dict() == single.state_dict()


def test_samples_without_answers_in_budget_are_skipped():
    class Data:
        loss_mask = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
        offsets = torch.tensor([0, 4, 8, 10])

    assert supervised_within(Data, 3).tolist() == [2]  # sample 0's answer is at position 3
    assert supervised_within(Data, 4).tolist() == [0, 2]  # sample 1 has none at all


def test_prepared_read_cuts_to_budget_and_layout_marks_documents(tiny_prepared):
    from specfast.data.prepared import PreparedData

    data = PreparedData.load(tiny_prepared)
    lengths = data.lengths()
    idx = [int(np.argmax(lengths)), 0]
    ids, mask, offsets = data.read(idx, batch_tokens=20)
    cut = [min(int(lengths[i]), 20) for i in idx]
    assert offsets.tolist() == [0, cut[0], cut[0] + cut[1]] and ids.dtype == torch.int64
    assert torch.equal(ids[cut[0] :], data.sample(0)[0][: cut[1]].long())
    assert torch.equal(mask[: cut[0]], data.sample(idx[0])[1][:20])
    doc_ids, pos = doc_layout(torch.tensor([3, 2]))
    assert doc_ids.tolist() == [0, 0, 0, 1, 1] and pos.tolist() == [0, 1, 2, 0, 1]
