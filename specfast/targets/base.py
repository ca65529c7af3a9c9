"""The TargetModel interface (DESIGN §7). A backend turns packed token rows into the three aux hidden
states, the final hidden state (after the model's final norm) and the full-vocabulary argmax; it also
hands out the lm_head rows of the draft vocabulary, the frozen embeddings and the tokenizer."""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# Aux layer ids are stored as "output of 0-based decoder layer i" (what HF's hidden_states[i + 1] holds).
# vLLM names the same tensor "input of layer i + 1"; SGLang's config uses our convention and adds 1.
AUX_CONVENTION = "output_of_layer_0based"


def aux_layer_ids_default(num_layers: int) -> list[int]:
    """EAGLE-3's default: outputs of layers [1, L//2 - 1, L - 4] (vLLM: inputs of 2, L//2, L - 3)."""
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    check_aux_layer_ids(ids, num_layers)
    return ids


def check_aux_layer_ids(ids: list[int], num_layers: int) -> None:
    """Three distinct ascending layers: vLLM sorts and de-duplicates the ids it captures, so `fc`'s input
    blocks only line up with what it feeds if ours are already in that order."""
    if len(ids) != 3 or any(not 0 <= i < num_layers for i in ids) or sorted(set(ids)) != list(ids):
        raise ValueError(f"aux layer ids {ids} must be 3 distinct ascending layers in [0, {num_layers}) "
                         f"({AUX_CONVENTION}); a {num_layers}-layer target "
                         + ("is too shallow for EAGLE-3's default" if num_layers < 8 else "needs --aux-layer-ids"))


@dataclass
class PackedTargetOutput:
    """Per-token target outputs for one packed row of T tokens (several documents back to back)."""

    aux_hidden: torch.Tensor  # [T, 3 * H]
    final_hidden: torch.Tensor  # [T, H], after the target's final norm
    argmax: torch.Tensor  # [T] int64, the target's full-vocabulary argmax (its own next-token pick)


class TargetModel(ABC):
    """What the trainer, capture and eval need of a target LLM."""

    name: str
    tokenizer: object
    num_layers: int
    hidden_size: int
    vocab_size: int
    aux_layer_ids: list[int]
    hf_config: object  # the model's config (rope fields, heads, eps) that the draft copies

    @abstractmethod
    def forward_packed(self, input_ids: torch.Tensor, doc_ids: torch.Tensor) -> PackedTargetOutput:
        """input_ids, doc_ids: [T]; documents are contiguous runs of equal doc id."""

    @abstractmethod
    def lm_head_weight(self) -> torch.Tensor:
        """[V_target, H] output projection (frozen)."""

    @abstractmethod
    def embed_weight(self) -> torch.Tensor:
        """[V_target, H] input embeddings (frozen; the draft shares them)."""

    def final_norm_weight(self) -> torch.Tensor | None:
        """The final norm's weight, if the model has a plain RMSNorm there (to initialise the draft's)."""
        return None

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight().device

    def teacher_logits(self, final_hidden: torch.Tensor, draft_ids: torch.Tensor) -> torch.Tensor:
        """The target's logits restricted to the draft vocabulary: h_final @ W_lm[draft_ids]ᵀ, in fp32."""
        w = self.lm_head_weight()[draft_ids.to(self.device)]
        return final_hidden.float() @ w.float().t()

    def tokenizer_hash(self) -> str:
        return tokenizer_hash(self.tokenizer)


def tokenizer_hash(tokenizer) -> str:
    """A short fingerprint of the vocabulary, merges and chat template; shards and exports record it."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]
