"""The TargetModel interface: what the trainer, capture, eval and `prepare --regenerate` need of a
target LLM. A backend turns packed token rows into the three aux hidden states (the outputs of the
0-based decoder layers `aux_layer_ids`, see specfast.conventions), the final hidden state (after the
model's final norm) and the full-vocabulary argmax; it hands out the lm_head rows of the draft
vocabulary, the frozen embeddings and the tokenizer; and, where it has its decoder layers, it
decodes: a KV-cached forward for speculative decoding and batched generation."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from specfast.conventions import aux_layer_ids_default, check_aux_layer_ids
from specfast.kernels import full_vocab_argmax


@dataclass
class PackedTargetOutput:
    """Per-token target outputs for one packed row of T tokens (several documents back to back)."""

    aux_hidden: torch.Tensor  # [T, 3 * H]
    final_hidden: torch.Tensor  # [T, H], after the target's final norm
    # [T] int64: the target's full-vocabulary argmax (its own next-token pick) at the rows asked
    # for (`argmax_rows` of forward_packed; all rows without it) and -1 at the others. Index with
    # it only where it is >= 0: -1 would silently pick a tensor's last element.
    argmax: torch.Tensor
    # [T] int64, or None: the draft's RoPE position of each row where it is not the position within
    # the document (multimodal targets with mRoPE: row 0 of the target's positions; see
    # specfast.ttt.draft_positions). None for text targets.
    positions: torch.Tensor | None = None


class TargetCache(Protocol):
    """A target's KV cache for one sequence (from `TargetModel.new_cache`)."""

    def __len__(self) -> int:
        """Positions it holds."""

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (speculative decoding drops rejected drafts)."""


class TargetModel(ABC):
    """A target LLM; see the module docstring. The decoding methods are optional: a backend without
    decoder layers (HeadsOnlyTarget) raises NotImplementedError from them."""

    name: str
    tokenizer: object
    num_layers: int
    hidden_size: int
    vocab_size: int
    aux_layer_ids: list[int]
    hf_config: object  # the model's config (rope fields, heads, eps) that the draft copies

    def _set_shape(self, text_config, vocab_size: int, aux_layer_ids: list[int] | None) -> None:
        """Layers, width, vocabulary and aux layers (the EAGLE-3 default unless given; checked)
        from the language model's config."""
        self.num_layers = text_config.num_hidden_layers
        self.hidden_size = text_config.hidden_size
        self.vocab_size = vocab_size
        self.aux_layer_ids = (
            list(aux_layer_ids)
            if aux_layer_ids is not None
            else aux_layer_ids_default(self.num_layers)
        )
        check_aux_layer_ids(self.aux_layer_ids, self.num_layers, self.name)

    def _argmax(self, final: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Full-vocabulary argmax of the `rows` (all when None); -1 elsewhere."""
        if rows is None:
            return full_vocab_argmax(final, self.lm_head_weight())
        rows = rows.to(self.device)
        if rows.dtype != torch.bool or rows.shape != final.shape[:1]:
            raise ValueError(
                f"argmax_rows must be bool [{final.shape[0]}], got {rows.dtype} {tuple(rows.shape)}"
            )
        argmax = torch.full(rows.shape, -1, dtype=torch.int64, device=self.device)
        argmax[rows] = full_vocab_argmax(final[rows], self.lm_head_weight())
        return argmax

    @abstractmethod
    def forward_packed(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor,
        argmax_rows: torch.Tensor | None = None,
    ) -> PackedTargetOutput:
        """input_ids, doc_ids: [T]; documents are contiguous runs of equal doc id, each attending
        causally to itself only, with positions restarting at 0. `argmax_rows` (bool [T]): the
        rows whose full-vocabulary argmax is computed (2·V·H FLOPs a row); the others get -1.
        None computes every row."""

    @abstractmethod
    def lm_head_weight(self) -> torch.Tensor:
        """[V_target, H] output projection (frozen)."""

    @abstractmethod
    def embed_weight(self) -> torch.Tensor:
        """[V_target, H] input embeddings (frozen; the draft shares them)."""

    def final_norm_weight(self) -> torch.Tensor | None:
        """The final norm's weight, if it is a plain RMSNorm (the draft's can start from it)."""
        return None

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight().device

    def teacher_logits(self, final_hidden: torch.Tensor, draft_ids: torch.Tensor) -> torch.Tensor:
        """The target's logits over the draft vocabulary: h_final @ W_lm[draft_ids]ᵀ, in fp32."""
        w = self.lm_head_weight()[draft_ids.to(self.device)]
        return final_hidden.float() @ w.float().t()

    def tokenizer_hash(self) -> str:
        return tokenizer_hash(self.tokenizer)

    def eos_token_ids(self) -> set[int]:
        """Token ids that end an answer."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return set() if eos is None else {int(eos)}

    # -- decoding -------------------------------------------------------------------------------

    def new_cache(self) -> TargetCache:
        """An empty KV cache for `forward_cached`."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode")

    def forward_cached(
        self, tokens: list[int], cache: TargetCache, with_aux: bool = False, logits_to_keep: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed `tokens` (batch 1) after the positions `cache` holds, which it then holds too.
        Returns fp32 logits [logits_to_keep, V] of the last positions and, `with_aux`, the aux
        hidden states [1, len(tokens), 3 * H] (else None)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode")

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0
    ) -> list[list[int]]:
        """The answers to a batch of token-id prompts, each cut after its first EOS: greedy at
        temperature 0, else sampled from the full softmax(logits / temperature)."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate")


def tokenizer_hash(tokenizer) -> str:
    """A short fingerprint of the vocabulary, merges and chat template; prepared data and shards
    record it."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    h.update(vocab.encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()[:16]
