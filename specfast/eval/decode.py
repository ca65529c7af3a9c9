"""Decoding with the target and its KV cache (TargetModel.forward_cached), batch size 1: plain
generation (the baseline) and chain speculative decoding with a proposer, plus the two acceptance
rules.

Speculative loop, sequence x[0..L), the target's cache holding positions 0..L-1, x[L] just emitted:
    1. the proposer drafts d1..dK;
    2. the target reads [x[L], d1..dK] in one forward (positions L..L+K);
    3. the first n drafts are accepted and one more token comes from the target (the correction at
       the first rejection, or the bonus token when all K are accepted): n + 1 new tokens;
    4. the target's cache is cropped to L + n + 1 (the rejected drafts' entries go), and the
       proposer is re-fed positions L..L+n with the target's aux hidden states from step 2.
Greedy (temperature 0) accepts d_j iff it equals the target's argmax, so the output is the target's
own greedy output. Sampling uses speculative rejection sampling, which leaves the target's
distribution unchanged (Leviathan et al. 2023; Chen et al. 2023).
"""

from __future__ import annotations

import torch

from .stats import AcceptanceStats


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else a sample from softmax(logits / temperature)."""
    if temperature == 0:
        return int(logits.argmax())
    return sample(torch.softmax(logits / temperature, dim=-1), generator)


def accept_greedy(target_logits: torch.Tensor, proposals: list[int]) -> tuple[int, int]:
    """target_logits [K+1, V] at the verification rows. Returns (accepted n, the target's next
    token)."""
    best = target_logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(proposals) and proposals[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampled(
    p: torch.Tensor, q: torch.Tensor, proposals: list[int], generator: torch.Generator | None
) -> tuple[int, int]:
    """Speculative rejection sampling. p [K+1, V]: the target's probabilities at the verification
    rows; q [K, V]: the draft's, over target ids (zero outside the draft vocabulary). Draft token
    x_j is accepted with probability min(1, p_j(x)/q_j(x)); at the first rejection the next token
    is drawn from norm(max(0, p_j − q_j)); if all K are accepted, the bonus token is drawn from
    p_K."""
    p, q = p.cpu(), q.cpu()
    for j, x in enumerate(proposals):
        u = float(torch.rand((), generator=generator))
        # u < p/q, written without the division (q_j(x) > 0: x was drawn from q_j).
        if u * float(q[j, x]) < float(p[j, x]):
            continue
        residual = (p[j] - q[j]).clamp(min=0)
        # An all-zero residual needs p_j == q_j, where a rejection cannot happen; guard rounding.
        return j, sample(residual if float(residual.sum()) > 0 else p[j], generator)
    return len(proposals), sample(p[len(proposals)], generator)


def new_cache(target, media: list | None):
    """The target's cache for one sequence, holding the prompt's media where there are any."""
    return target.new_cache(media) if media else target.new_cache()


def extend(proposer, cache, start: int, tokens: list[int], aux: torch.Tensor) -> None:
    """Feed the proposer positions start..start+len(tokens)-1, with the RoPE positions the
    target's cache gives for them when it has its own (mRoPE targets)."""
    positions = getattr(cache, "draft_positions", None)
    if positions is None:
        proposer.extend(tokens, aux)
    else:
        proposer.extend(tokens, aux, positions(start, start + len(tokens)))


def _stop(tokens: list[int], eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """Cut at the first EOS (kept) and at max_new_tokens; True when generation is over."""
    for i, t in enumerate(tokens[:max_new_tokens]):
        if t in eos_ids:
            return tokens[: i + 1], True
    return tokens[:max_new_tokens], len(tokens) >= max_new_tokens


def generate_plain(
    target,
    prompt_ids: list[int],
    temperature: float,
    max_new_tokens: int,
    eos_ids: set[int],
    generator: torch.Generator | None = None,
    media: list | None = None,
) -> list[int]:
    """The target alone, one token per forward (the baseline). `media`: the prompt's images or
    audio, for a multimodal target."""
    cache = new_cache(target, media)
    logits, _ = target.forward_cached(prompt_ids, cache)
    out: list[int] = []
    while True:
        out.append(pick(logits[-1], temperature, generator))
        out, done = _stop(out, eos_ids, max_new_tokens)
        if done:
            return out
        logits, _ = target.forward_cached(out[-1:], cache)


def generate_speculative(
    target,
    proposer,
    prompt_ids: list[int],
    k: int,
    temperature: float,
    max_new_tokens: int,
    eos_ids: set[int],
    generator: torch.Generator | None,
    stats: AcceptanceStats,
    media: list | None = None,
) -> list[int]:
    """Chain speculative decoding (see the module docstring). `proposer` has reset(),
    extend(next_tokens, aux_hidden[, positions]) and propose(k, temperature, generator) ->
    Proposal (specfast.eval.proposer). `media`: the prompt's images or audio, for a multimodal
    target, whose cache then gives the draft its RoPE positions (specfast.ttt.draft_positions)."""
    if max_new_tokens < 1:
        return []
    cache = new_cache(target, media)
    logits, aux = target.forward_cached(prompt_ids, cache, with_aux=True)
    out = [pick(logits[-1], temperature, generator)]
    out, done = _stop(out, eos_ids, max_new_tokens)
    if done:
        return out
    proposer.reset()
    extend(proposer, cache, 0, prompt_ids[1:] + out, aux)  # positions 0..L-1 predict x[1..L]
    while True:
        proposal = proposer.propose(k, temperature, generator)
        if len(proposal.tokens) != k:
            raise RuntimeError(f"proposer returned {len(proposal.tokens)} tokens, asked for {k}")
        length = len(cache)
        logits, aux = target.forward_cached(
            out[-1:] + proposal.tokens, cache, with_aux=True, logits_to_keep=k + 1
        )
        if temperature == 0:
            n, nxt = accept_greedy(logits, proposal.tokens)
        else:
            n, nxt = accept_sampled(
                torch.softmax(logits / temperature, dim=-1), proposal.q, proposal.tokens, generator
            )
        stats.observe(n)
        new = proposal.tokens[:n] + [nxt]
        cache.crop(length + n + 1)  # keeps x[L], d1..dn; the rejected drafts' entries go
        out, done = _stop(out + new, eos_ids, max_new_tokens)
        if done:
            return out
        extend(proposer, cache, length, new, aux[:, : n + 1])
