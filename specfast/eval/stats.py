"""Acceptance accounting, counted exactly as vLLM counts it (vllm/v1/spec_decode/metrics.py):

    num_drafts                 verification steps that carried draft tokens
    num_draft_tokens           draft tokens proposed (K per draft)
    num_accepted_tokens        draft tokens the target accepted
    accepted_per_position[j]   drafts whose j-th draft token was accepted (0-based j)

    τ (mean acceptance length)  = 1 + num_accepted_tokens / num_drafts
    acceptance rate at j        = accepted_per_position[j] / num_drafts
    draft acceptance rate       = num_accepted_tokens / num_draft_tokens

Like vLLM, a draft counts what the verifier accepted before stop checks (EOS, max tokens) cut the
emitted tokens short.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AcceptanceStats:
    k: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"number of speculative tokens must be ≥ 1, not {self.k}")
        if not self.accepted_per_position:
            self.accepted_per_position = [0] * self.k

    def observe(self, num_accepted: int) -> None:
        """One verification of k draft tokens, of which the first `num_accepted` were accepted."""
        if not 0 <= num_accepted <= self.k:
            raise ValueError(f"accepted {num_accepted} of {self.k} draft tokens")
        self.num_drafts += 1
        self.num_draft_tokens += self.k
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    def merge(self, other: "AcceptanceStats") -> None:
        if other.k != self.k:
            raise ValueError(f"cannot merge acceptance stats for k={other.k} into k={self.k}")
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.accepted_per_position = [
            a + b for a, b in zip(self.accepted_per_position, other.accepted_per_position)
        ]

    @property
    def acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def to_dict(self) -> dict:
        d = max(self.num_drafts, 1)
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_position": list(self.accepted_per_position),
            "acceptance_length": self.acceptance_length,
            "acceptance_rate_per_position": [a / d for a in self.accepted_per_position],
            "draft_acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
        }
