"""Draft vocabulary: the V_draft most frequent target tokens among supervised positions, ties
broken by token id, stored sorted ascending, with the d2t / t2d maps vLLM and SGLang load."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DraftVocab:
    draft_ids: torch.Tensor  # int64 [V_draft], target ids sorted ascending
    target_vocab_size: int
    coverage: float  # share of supervised tokens whose id is in the draft vocabulary

    @property
    def size(self) -> int:
        return self.draft_ids.numel()

    @property
    def d2t(self) -> torch.Tensor:
        """Offsets: target_id = draft_id + d2t[draft_id]."""
        return self.draft_ids - torch.arange(self.size, dtype=torch.int64)

    @property
    def t2d(self) -> torch.Tensor:
        """bool [V_target]: which target ids are in the draft vocabulary."""
        t2d = torch.zeros(self.target_vocab_size, dtype=torch.bool)
        t2d[self.draft_ids] = True
        return t2d


def select_draft_vocab(counts: np.ndarray, draft_vocab_size: int) -> DraftVocab:
    """counts[t]: how often target token t is a supervised label."""
    counts = np.asarray(counts, dtype=np.int64)
    v = counts.shape[0]
    if not 0 < draft_vocab_size <= v:
        raise ValueError(
            f"draft vocabulary size {draft_vocab_size} must be in [1, {v}] "
            "(the target's vocabulary)"
        )
    # lexsort sorts by the last key first: count descending, then id ascending.
    order = np.lexsort((np.arange(v), -counts))[:draft_vocab_size]
    chosen = np.sort(order)
    total = counts.sum()
    coverage = float(counts[chosen].sum() / total) if total else 0.0
    return DraftVocab(torch.from_numpy(chosen.astype(np.int64)), v, coverage)
