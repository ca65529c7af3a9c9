"""The draft side of speculative decoding: an EAGLE-3 proposer with its own KV cache, run as vLLM's
EAGLE-3 proposer runs it at inference (and as specfast/ttt.py trains it).

Sequence x[0..L) with the target's aux hidden states a[t] (the target has read x[0..t]); the target
has just emitted x[L] (its cache holds positions 0..L-1).

    extend    for each newly verified position t: token x[t+1], hidden fc(a[t]), RoPE position t.
              Its keys/values become the committed cache; the hidden output at t = L-1 (before
              `norm`) is kept for proposing.
    propose   d1 = pick(lm_head(norm(h[L-1]))); for j = 1..K-1: step with token d_j, hidden = the
              previous step's output, position L-1+j, attending to the cache (committed positions
              and the earlier speculative steps, causal) -> d_{j+1}.
              Draft ids map to target ids through d2t: target_id = draft_id + d2t[draft_id].

After verification the speculative keys/values are dropped and the accepted positions are re-fed
through `extend` from the target's features: the draft's cache for accepted positions comes from
target features, never from its own speculative hidden states (as in vLLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specfast.model.draft import Eagle3Draft


class DraftKVCache:
    """Keys/values of the draft's one layer for positions 0..len-1, plus causal GQA attention."""

    def __init__(self):
        self.k: torch.Tensor | None = None  # [1, nkv, S, hd]
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def crop(self, length: int) -> None:
        if self.k is not None and length < len(self):
            self.k, self.v = self.k[:, :, :length], self.v[:, :, :length]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The `attend` callback of Eagle3Draft.step: q [1, nh, T, hd], k/v [1, nkv, T, hd] for T
        new positions right after the cache. Appends k/v; query i sees cached keys and new keys
        ≤ i."""
        start = len(self)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        nh, nkv = q.shape[1], k.shape[1]
        if nh % nkv:
            raise ValueError(f"{nh} query heads do not split into {nkv} key/value heads")
        # GQA: query head h reads key/value head h // (nh / nkv).
        keys = self.k.repeat_interleave(nh // nkv, dim=1)
        values = self.v.repeat_interleave(nh // nkv, dim=1)
        T, S = q.shape[2], keys.shape[2]
        visible = (
            torch.arange(S, device=q.device)[None, :]
            <= start + torch.arange(T, device=q.device)[:, None]
        )
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)


@dataclass
class Proposal:
    tokens: list[int]  # K target token ids
    q: torch.Tensor | None  # [K, V_target] fp32 draft probabilities in target ids (None: greedy)


class Eagle3Proposer:
    """Wraps an Eagle3Draft (embeddings attached) for one sequence at a time."""

    def __init__(self, draft: Eagle3Draft):
        self.draft = draft
        self.cache = DraftKVCache()
        self.committed = 0  # positions whose keys came from target features
        self.last_position = -1  # RoPE position of committed-1
        self.h_last: torch.Tensor | None = None  # [1, 1, H], output at position committed-1
        self.d2t = draft.d2t.tolist()
        self.draft_ids = draft.draft_ids.cpu()

    def reset(self) -> None:
        self.cache = DraftKVCache()
        self.committed = 0
        self.last_position = -1
        self.h_last = None

    @torch.no_grad()
    def extend(self, next_tokens: list[int], aux_hidden: torch.Tensor, positions=None) -> None:
        """next_tokens[i] = x[t+1] and aux_hidden[0, i] = a[t] for the newly verified positions
        t = committed, committed+1, …; aux_hidden [1, n, 3·H_target]. `positions` [n]: their
        RoPE positions where they are not t (an mRoPE target: row 0 of its positions, see
        specfast.ttt.draft_positions); proposals continue from the last one + 1, + 2, …"""
        n = len(next_tokens)
        if aux_hidden.shape[1] != n:
            raise ValueError(f"{n} tokens but {aux_hidden.shape[1]} aux hidden states")
        # Speculative entries out; the accepted ones are recomputed below.
        self.cache.crop(self.committed)
        d = self.draft
        dev = d.fc.weight.device
        h = d.fc(aux_hidden.to(device=dev, dtype=d.fc.weight.dtype))
        tokens = torch.tensor([next_tokens], device=dev)
        if positions is None:
            positions = torch.arange(self.committed, self.committed + n)
        positions = torch.as_tensor(positions, device=dev).reshape(1, n)
        out = d.step(tokens, h, positions, self.cache.attend)
        self.last_position = int(positions[0, -1])
        self.committed += n
        self.h_last = out[:, -1:]

    @torch.no_grad()
    def propose(self, k: int, temperature: float, generator: torch.Generator | None) -> Proposal:
        if self.h_last is None:
            raise RuntimeError("propose() before extend(): the draft has no verified position yet")
        d = self.draft
        dev = d.fc.weight.device
        h, tokens, qs = self.h_last, [], []
        for j in range(k):
            if j > 0:
                token = torch.tensor([[tokens[-1]]], device=dev)
                pos = torch.tensor([[self.last_position + j]], device=dev)
                h = d.step(token, h, pos, self.cache.attend)
            logits = d.logits(h)[0, -1].float()
            if temperature == 0:
                draft_id = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                draft_id = int(torch.multinomial(probs, 1, generator=generator))
                # q over the target vocabulary: the draft's probabilities at its tokens' target ids.
                q = torch.zeros(d.config.vocab_size, dtype=torch.float32)
                q[self.draft_ids] = probs
                qs.append(q)
            tokens.append(draft_id + self.d2t[draft_id])
        return Proposal(tokens, torch.stack(qs) if qs else None)
