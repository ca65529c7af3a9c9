"""Training-time-test attention: step k's queries see the step-0 keys causally (within their own
document) and the keys of steps 1..k on the diagonal (same position only).

    out[b, h, i] = softmax over {keys[0][b, h', j] : j ≤ i, same doc} ∪ {keys[s][b, h', i] : 1 ≤ s < S}
                   of q·k·scale, applied to the matching values;  h' = h // (Hq / Hkv)
"""
import torch


def ttt_attention_reference(q, keys, values, doc_ids=None, scale=None):
    """The definition: scores against all S·L keys under a dense [L, S·L] boolean mask."""
    S, B, Hkv, L, D = keys.shape
    Hq = q.shape[1]
    assert Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}"
    scale = D ** -0.5 if scale is None else scale
    g = Hq // Hkv
    k = keys.float().repeat_interleave(g, dim=2).permute(1, 2, 0, 3, 4).reshape(B, Hq, S * L, D)
    v = values.float().repeat_interleave(g, dim=2).permute(1, 2, 0, 3, 4).reshape(B, Hq, S * L, D)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, L, S·L]

    i = torch.arange(L, device=q.device)
    causal = i[:, None] >= i[None, :]  # [L, L] for step 0
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, L, L]
        causal = causal[None] & same_doc
    else:
        causal = causal[None].expand(B, L, L)
    diag = torch.eye(L, dtype=torch.bool, device=q.device)[None].expand(B, L, L)
    mask = torch.cat([causal] + [diag] * (S - 1), dim=-1)  # [B, L, S·L]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)


def ttt_attention(q, keys, values, doc_ids=None, scale=None):
    """q [B, Hq, L, D]; keys, values [S, B, Hkv, L, D]; doc_ids [B, L] or None. Returns [B, Hq, L, D]."""
    return ttt_attention_reference(q, keys, values, doc_ids, scale)
