"""The target's full-vocabulary argmax of hidden · weightᵀ without building a [T, V_target] tensor.

The trainer uses it to drop positions whose target argmax lies outside the draft vocabulary. The
logits are formed in fp32 one [chunk, chunk] block at a time and only a running (max, index) per row
is kept, so memory is O(T + chunk²) whatever V_target is (128k-token vocabularies are common).
"""

import torch


@torch.no_grad()
def full_vocab_argmax(hidden, weight, chunk_size=4096):
    """hidden [T, H], weight [V, H] → int64 [T]: argmax_v(hidden_t · weight_vᵀ), ties → lowest
    index.

    chunk_size bounds both the rows and the vocabulary columns of one logits block
    (fp32 [chunk_size, chunk_size], 64 MiB at the default)."""
    T, H = hidden.shape
    V = weight.shape[0]
    assert weight.shape == (V, H), (
        f"weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}"
    )
    assert chunk_size >= 1
    out = torch.empty(T, dtype=torch.int64, device=hidden.device)
    for t0 in range(0, T, chunk_size):
        h = hidden[t0 : t0 + chunk_size].float()
        best = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=hidden.device)
        best_idx = torch.zeros(h.shape[0], dtype=torch.int64, device=hidden.device)
        for v0 in range(0, V, chunk_size):
            # fp32 weight rows per block: a bf16 logit would round near-ties into false ties
            z = h @ weight[v0 : v0 + chunk_size].float().t()
            val, idx = z.max(-1)  # first maximal index within the block
            better = val > best  # strict: an equal value in a later block keeps the lower index
            best = torch.where(better, val, best)
            best_idx = torch.where(better, idx + v0, best_idx)
        out[t0 : t0 + chunk_size] = best_idx
    return out
