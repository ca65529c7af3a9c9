"""Token-budget batching: every eligible sample once per epoch, within the budget, reproducible from a
seed and resumable from a saved position."""
import numpy as np
import torch

from specfast.train.batches import TokenBudgetSampler, pack, supervised_within


def test_epoch_covers_eligible_samples_within_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 50, size=97)
    eligible = np.sort(rng.choice(97, size=80, replace=False))
    s = TokenBudgetSampler(lengths, 64, seed=seed, eligible=eligible)
    seen = []
    while s.epoch == 0:
        batch = s.next_indices()
        if s.epoch:  # the call that rolled into epoch 1
            break
        assert sum(min(lengths[i], 64) for i in batch) <= 64 or len(batch) == 1
        seen += batch
    assert sorted(seen) == eligible.tolist()


def test_same_seed_same_batches_and_resume_from_position(seed):
    lengths = np.random.default_rng(seed).integers(1, 30, size=40)
    a = TokenBudgetSampler(lengths, 50, seed=7)
    first = [a.next_indices() for _ in range(25)]  # crosses into a second epoch
    b = TokenBudgetSampler(lengths, 50, seed=7)
    for _ in range(11):
        b.next_indices()
    c = TokenBudgetSampler(lengths, 50, seed=7)
    c.load_state_dict(b.state_dict())
    assert [c.next_indices() for _ in range(14)] == first[11:]
    assert [TokenBudgetSampler(lengths, 50, seed=8).next_indices() for _ in range(3)] != first[:3]


def test_samples_without_answers_in_budget_are_skipped():
    class Data:
        loss_mask = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
        offsets = torch.tensor([0, 4, 8, 10])

    assert supervised_within(Data, 3).tolist() == [2]  # sample 0's answer is at position 3
    assert supervised_within(Data, 4).tolist() == [0, 2]  # sample 1 has none at all


def test_pack_marks_documents_and_positions():
    ids, labels, doc_ids, pos = pack([(torch.tensor([5, 6, 7]), torch.tensor([0, 1, 1])),
                                      (torch.tensor([8, 9]), torch.tensor([1, 0]))], budget=10)
    assert ids.tolist() == [5, 6, 7, 8, 9] and labels.tolist() == [False, True, True, True, False]
    assert doc_ids.tolist() == [0, 0, 0, 1, 1] and pos.tolist() == [0, 1, 2, 0, 1]
