"""The target's full-vocabulary argmax of hidden · weightᵀ without building a [T, V_target] tensor.

The trainer uses it to drop positions whose target argmax lies outside the draft vocabulary. The
logits are formed in fp32 one [chunk, chunk] block at a time and only a running (max, index) per row
is kept, so memory is O(T + chunk²) whatever V_target is (128k-token vocabularies are common).
"""

import torch


def full_vocab_argmax(hidden, weight, chunk_size=4096):
    """hidden [T, H], weight [V, H] → int64 [T]: argmax_v(hidden_t · weight_vᵀ), ties → lowest
    index.

    chunk_size bounds both the rows and the vocabulary columns of one logits block
    (fp32 [chunk_size, chunk_size], 64 MiB at the default)."""
    T, H = hidden.shape
    assert weight.shape == (weight.shape[0], H), (
        f"weight {tuple(weight.shape)} does not match hidden {tuple(hidden.shape)}"
    )
    assert chunk_size >= 1
    no_columns = torch.zeros(0, dtype=torch.int64, device=weight.device)
    return SplitVocabArgmax(weight, no_columns, chunk_size=chunk_size)(hidden)[0]


class SplitVocabArgmax:
    """The full-vocabulary argmax of `full_vocab_argmax` (same result: ties → lowest index) that
    also hands out the fp32 logits of a kept set of columns, e.g. a draft vocabulary: a trainer
    needs both, the argmax over every target token and the teacher logits over the draft tokens,
    and the kept columns are part of the argmax's work, so they are formed once.

    Exact path (default): the logits block by block as in `full_vocab_argmax`, the kept columns
    copied out of each block. Work per row 2·H·V instead of 2·H·(V + K).

    Screened path (`screen_dtype`, e.g. torch.bfloat16 on CPUs whose bf16 matmuls run ~2x fp32):
    the kept columns in fp32, the others in the screen dtype, and in fp32 again only the columns
    that could still win, so the argmax stays exact. Bound: a bf16 matmul (operands rounded with
    unit roundoff u, products exact, sums in fp32) is within (2u + u²)·Σ|h_i·w_i| plus the fp32
    summation error of the fp32 logit, ≤ c·‖h‖·‖w‖ (`_bound`); a column whose screened logit plus
    c·‖h‖·‖w‖ is below the best exact logit so far cannot be the argmax. Only for matmuls that sum
    in fp32: CPU oneDNN does; cuBLAS may reduce in bf16, so do not screen on CUDA. Work per row
    2·H·K fp32 + 2·H·(V − K) in the screen dtype + a few candidate dot products.

    Memory: the screened path holds the other columns in the screen dtype and their norms;
    `keep_weight` (weight[keep_ids], fp32 or the weight's dtype) may be passed to share a copy
    the caller already has. Transient: one [T, chunk_size] fp32 block."""

    def __init__(self, weight, keep_ids, screen_dtype=None, chunk_size=4096, keep_weight=None):
        V, H = weight.shape
        keep_ids = keep_ids.to(weight.device).long()
        if keep_ids.dim() != 1 or not bool((keep_ids[1:] > keep_ids[:-1]).all()):
            raise ValueError("keep_ids must be ascending distinct column ids")
        if keep_ids.numel() and not (0 <= int(keep_ids[0]) and int(keep_ids[-1]) < V):
            raise ValueError(f"keep_ids must lie in [0, {V})")
        if keep_weight is not None and keep_weight.shape != (keep_ids.numel(), H):
            raise ValueError(f"keep_weight {tuple(keep_weight.shape)}: not weight[keep_ids]")
        self.weight, self.keep_ids, self.chunk_size = weight, keep_ids, chunk_size
        self.screen_dtype = screen_dtype
        if screen_dtype is not None:
            self.keep_weight = weight[keep_ids] if keep_weight is None else keep_weight
            other = torch.ones(V, dtype=torch.bool, device=weight.device)
            other[keep_ids] = False
            self.other_ids = other.nonzero()[:, 0]
            others = weight[self.other_ids]
            self.other_screen, self.other_norm = others.to(screen_dtype), others.float().norm(dim=1)
            self.bound = _bound(screen_dtype, H)

    @torch.no_grad()
    def __call__(self, hidden):
        """hidden [T, H] → (argmax int64 [T] over all V columns, fp32 [T, K] logits of keep_ids).
        Rows go chunk_size at a time (fp32 [chunk_size, chunk_size] logits blocks)."""
        one = self._exact if self.screen_dtype is None else self._screened
        parts = [
            one(hidden[t0 : t0 + self.chunk_size].float())
            for t0 in range(0, hidden.shape[0], self.chunk_size)
        ]
        if not parts:
            return one(hidden.float())
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def kept_logits(self, hidden):
        """hidden [T, H] → fp32 [T, K]: the kept columns' logits alone, as __call__ gives them
        (for a caller that already has the argmax)."""
        w = self.keep_weight if self.screen_dtype is not None else self.weight[self.keep_ids]
        return hidden.float() @ w.float().t()

    def _exact(self, h):
        V, K = self.weight.shape[0], self.keep_ids.numel()
        kept = torch.empty(h.shape[0], K, dtype=torch.float32, device=h.device)
        best = torch.full_like(h[:, 0], float("-inf"))
        best_id = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
        bounds = torch.searchsorted(
            self.keep_ids, torch.arange(0, V + self.chunk_size, self.chunk_size).to(h.device)
        ).tolist()
        for i, v0 in enumerate(range(0, V, self.chunk_size)):
            z = h @ self.weight[v0 : v0 + self.chunk_size].float().t()
            val, idx = z.max(-1)
            better = val > best  # strict: a later block's equal value keeps the lower index
            best = torch.where(better, val, best)
            best_id = torch.where(better, idx + v0, best_id)
            k0, k1 = bounds[i], bounds[i + 1]
            kept[:, k0:k1] = z[:, self.keep_ids[k0:k1] - v0]
        return best_id, kept

    def _screened(self, h):
        kept = self.kept_logits(h)
        best = torch.full_like(h[:, 0], float("-inf"))
        best_id = torch.zeros(h.shape[0], dtype=torch.int64, device=h.device)
        if kept.shape[1]:
            best, pos = kept.max(-1)  # first maximum: the lowest id, keep_ids ascending
            best_id = self.keep_ids[pos]
        h_screen, h_norm = h.to(self.screen_dtype), h.norm(dim=1)
        for v0 in range(0, self.other_ids.numel(), self.chunk_size):
            cols = slice(v0, v0 + self.chunk_size)
            upper = (h_screen @ self.other_screen[cols].t()).float()
            upper.addr_(h_norm, self.other_norm[cols], alpha=self.bound)
            rows, idx = (upper >= best[:, None]).nonzero(as_tuple=True)
            del upper
            ids = self.other_ids[idx + v0]
            val = (h[rows] * self.weight[ids].float()).sum(-1)  # fp32, the candidates only
            best, best_id = _merge(best, best_id, rows, val, ids)
        return best_id, kept


def _bound(dtype, H):
    """c with |z̃ − z| ≤ c·‖h‖·‖w‖ (see SplitVocabArgmax), with room for both fp32 sums."""
    u = torch.finfo(dtype).eps / 2  # unit roundoff: 2^-8 for bf16
    return 2 * u + u * u + 2 * H * 2.0**-23


def _merge(best, best_id, rows, val, ids):
    """Fold candidate (row, value, id) triples into the running best per row: the larger value,
    the lower id on a tie."""
    if rows.numel() == 0:
        return best, best_id
    row_max = torch.full_like(best, float("-inf")).scatter_reduce(0, rows, val, "amax")
    at_max = val == row_max[rows]
    row_id = torch.full_like(best_id, torch.iinfo(torch.int64).max)
    row_id = row_id.scatter_reduce(0, rows[at_max], ids[at_max], "amin")
    better = (row_max > best) | ((row_max == best) & (row_id < best_id))
    return torch.where(better, row_max, best), torch.where(better, row_id, best_id)
