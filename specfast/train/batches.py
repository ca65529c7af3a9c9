"""Token-budget batches: samples in a seeded per-epoch order, packed greedily into rows of at most
`budget` tokens with document boundaries (no padding). The position (epoch, cursor) is all a
checkpoint needs to continue with exactly the same batches."""
from __future__ import annotations

import numpy as np
import torch

from specfast.ttt import PackedBatch


class TokenBudgetSampler:
    """`eligible`: indices of the samples to draw from (default all)."""

    def __init__(self, lengths: np.ndarray, budget: int, seed: int, eligible: np.ndarray | None = None):
        self.lengths = np.minimum(np.asarray(lengths), budget)
        self.eligible = np.arange(len(lengths)) if eligible is None else np.asarray(eligible)
        if len(self.eligible) == 0:
            raise ValueError("no samples to train on")
        self.budget, self.seed = budget, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.eligible[torch.randperm(len(self.eligible), generator=g).numpy()]

    def next_indices(self) -> list[int]:
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        out, used = [], 0
        while self.cursor < len(self._order):
            i = int(self._order[self.cursor])
            if out and used + self.lengths[i] > self.budget:
                break
            out.append(i)
            used += int(self.lengths[i])
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "budget": self.budget}

    def load_state_dict(self, s: dict) -> None:
        if s["seed"] != self.seed or s["budget"] != self.budget:
            raise ValueError(f"checkpoint data order (seed {s['seed']}, budget {s['budget']}) differs from this "
                             f"run's (seed {self.seed}, budget {self.budget})")
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        self._order = self._permutation(self.epoch)


def pack(samples: list[tuple[torch.Tensor, torch.Tensor]], budget: int):
    """[(ids, label_mask)] -> concatenated ids, labels, doc_ids, positions (each sample cut to budget)."""
    ids = [s[0][:budget].long() for s in samples]
    labels = [s[1][:budget].bool() for s in samples]
    lengths = torch.tensor([x.numel() for x in ids])
    doc_ids = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    return torch.cat(ids), torch.cat(labels), doc_ids, positions


def supervised_within(data, budget: int) -> np.ndarray:
    """Samples with at least one supervised token in their first `budget` tokens (the rest would only
    cost a target forward: a long prompt cut to the budget can lose its whole answer)."""
    labels = np.concatenate([[0], np.cumsum(data.loss_mask.numpy(), dtype=np.int64)])
    starts = data.offsets[:-1].numpy()
    ends = np.minimum(data.offsets[1:].numpy(), starts + budget)
    keep = np.nonzero(labels[ends] - labels[starts] > 0)[0]
    if len(keep) < len(starts):
        import logging

        logging.getLogger("specfast").info("%d of %d samples have no assistant token within %d tokens; skipped",
                                           len(starts) - len(keep), len(starts), budget)
    return keep


class OnlineBatches:
    """Batches whose hidden states come from running the target inside the training step."""

    def __init__(self, data, target, budget: int, seed: int, device: torch.device):
        self.data, self.target, self.budget, self.device = data, target, budget, device
        self.sampler = TokenBudgetSampler(data.lengths(), budget, seed, supervised_within(data, budget))
        self.draft_ids = data.vocab.draft_ids.to(device)
        self.t2d = data.vocab.t2d.to(device)

    def next(self) -> PackedBatch:
        idx = self.sampler.next_indices()
        ids, labels, doc_ids, positions = pack([self.data.sample(i) for i in idx], self.budget)
        out = self.target.forward_packed(ids, doc_ids)
        d = self.device
        return PackedBatch(
            input_ids=ids.to(d), doc_ids=doc_ids.to(d), positions=positions.to(d), label_mask=labels.to(d),
            aux_hidden=out.aux_hidden, teacher_logits=self.target.teacher_logits(out.final_hidden, self.draft_ids),
            target_in_vocab=self.t2d[out.argmax],
        )

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.sampler.load_state_dict(s)
