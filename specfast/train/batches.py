"""Token-budget batches: samples in a seeded per-epoch order, packed greedily into rows of at most
`budget` tokens with document boundaries (no padding). The position (epoch, cursor) is all a
checkpoint needs to continue with exactly the same batches."""
from __future__ import annotations

import numpy as np
import torch

from specfast import _shardio
from specfast.ttt import PackedBatch


def check_same_order(saved: dict, seed: int, budget: int) -> None:
    """A data position only means something under the seed and budget that produced it."""
    if saved["seed"] != seed or saved["budget"] != budget:
        raise ValueError(f"checkpoint data order (seed {saved['seed']}, budget {saved['budget']}) differs from this "
                         f"run's (seed {seed}, budget {budget})")


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
        # The shard reader's permutation: online and offline runs on the same samples see the same batches.
        return self.eligible[_shardio.permutation(len(self.eligible), self.seed, epoch)]

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
        check_same_order(s, self.seed, self.budget)
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        self._order = self._permutation(self.epoch)


def doc_layout(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Document id and position within the document of every token of a packed row."""
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return doc_ids, torch.arange(int(lengths.sum())) - starts


def pack(samples: list[tuple[torch.Tensor, torch.Tensor]], budget: int):
    """[(ids, label_mask)] -> concatenated ids, labels, doc_ids, positions (each sample cut to budget)."""
    ids = [s[0][:budget].long() for s in samples]
    labels = [s[1][:budget].bool() for s in samples]
    doc_ids, positions = doc_layout(torch.tensor([x.numel() for x in ids]))
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
        self.vocab = data.vocab

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


class OfflineBatches:
    """Batches read from hidden-state shards (specfast capture) by the C++ reader: no target forward.
    Same sample order and packing as OnlineBatches over the same samples."""

    def __init__(self, dataset, target, vocab, budget: int, seed: int, device: torch.device):
        self.dataset, self.target, self.vocab = dataset, target, vocab
        self.budget, self.seed, self.device = budget, seed, device
        self.draft_ids = vocab.draft_ids.to(device)
        self.t2d = vocab.t2d.to(device)
        self.epoch, self.cursor = 0, 0
        self._reader = None

    def _open(self):
        from specfast.shards import ShardReader

        self._reader = ShardReader(self.dataset, self.budget, self.seed, epoch=self.epoch, start=self.cursor,
                                   pin_memory=self.device.type == "cuda")

    def next(self) -> PackedBatch:
        if self._reader is None:
            self._open()
        try:
            b = next(self._reader)
        except StopIteration:
            self._reader.close()
            self.epoch, self.cursor = self.epoch + 1, 0
            self._open()
            b = next(self._reader)
        self.cursor = self._reader.position()
        d = self.device
        doc_ids, positions = doc_layout(b["offsets"].diff())
        final = b["final_hidden"].to(d, non_blocking=True)
        return PackedBatch(
            input_ids=b["input_ids"].to(d).long(), doc_ids=doc_ids.to(d), positions=positions.to(d),
            label_mask=b["loss_mask"].to(d).bool(), aux_hidden=b["aux_hidden"].to(d, non_blocking=True),
            teacher_logits=self.target.teacher_logits(final, self.draft_ids),
            target_in_vocab=self.t2d[b["target_argmax"].to(d).long()],
        )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "budget": self.budget}

    def load_state_dict(self, s: dict) -> None:
        check_same_order(s, self.seed, self.budget)
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])
        if self._reader is not None:
            self._reader.close()
        self._reader = None
