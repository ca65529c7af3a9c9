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


def test_plan_is_the_seeded_permutation_packed_greedily(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 80, size=97)  # some longer than the batch_tokens: cut to it
    eligible = np.sort(rng.choice(97, size=80, replace=False))
    plan = BatchPlan(lengths, 64, seed=seed, eligible=eligible)
    for epoch in range(2):
        order = eligible[_shardio.permutation(len(eligible), seed, epoch)]
        want = greedy_reference(lengths, 64, order)
        got = [plan.next().tolist() for _ in range(len(want))]
        assert got == want
        assert sorted(sum(got, [])) == eligible.tolist()
    assert plan.state_dict()["epoch"] == 1


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
