"""How the draft's `fc` starts: scaled to the target's measured aux hidden states, or plain.

`fc` maps the three concatenated aux hidden states [a_1, a_2, a_3] (each H_target wide) to the
draft's residual stream. A target's aux states are large and unequal: SmolLM2's layers 1 / 14 / 26
have a per-token RMS of about 2.8 / 6.4 / 23, and its first token (an attention sink) about 1000.
With the generic std-0.02 init, `fc(aux)` has RMS ~11 while the layer's attention and MLP branches
add ~0.2 and ~0.1, so at the start the draft's output is `fc(aux)` (cosine 0.9998) and the input
token's embedding is ignored. The export format does not change with the init: only the values of
`fc.weight` do.

    "aux_rms"  (default) each third of `fc.weight` is drawn with std c / rms_j, where rms_j is the
               measured RMS of aux chunk j over the first batch's tokens, sinks left out, and
               c = target_rms / sqrt(3·H_target): every chunk adds the same share and `fc(aux)`
               has RMS ≈ target_rms.
    "normal"   std 0.02 everywhere (the generic init; what drafts started from before).

Sinks are left out of the measurement because a handful of tokens ~400× larger than the rest
would set the scale for all: a token is a sink if it opens its document (position 0) or if its RMS
in any chunk exceeds SINK_RATIO times that chunk's median.
"""

from __future__ import annotations

import math

import torch

FC_INITS = ("aux_rms", "normal")
SINK_RATIO = 10.0
NORMAL_STD = 0.02


def aux_chunk_rms(
    aux_hidden: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[list[float], int]:
    """RMS of each of the three aux chunks over the non-sink tokens of `aux_hidden` [T, 3·H]
    (`positions` [T]: position within the document; 0 opens a document). Returns (rms per chunk,
    number of sink tokens left out)."""
    if aux_hidden.dim() != 2 or aux_hidden.shape[1] % 3:
        raise ValueError(f"aux_hidden must be [T, 3·H], got {tuple(aux_hidden.shape)}")
    T, width = aux_hidden.shape
    H = width // 3
    chunks = aux_hidden.detach().float().reshape(T, 3, H)
    per_token = chunks.pow(2).mean(-1).sqrt()  # [T, 3]
    sink = (per_token > SINK_RATIO * per_token.median(0).values).any(-1)
    if positions is not None:
        if positions.shape != (T,):
            raise ValueError(f"positions must be [{T}], got {tuple(positions.shape)}")
        sink |= positions.to(sink.device) == 0
    kept = per_token[~sink]
    if kept.shape[0] == 0:
        raise ValueError("fc init: every token of the batch looks like an attention sink")
    rms = kept.pow(2).mean(0).sqrt()
    if not bool(torch.isfinite(rms).all()) or bool((rms <= 0).any()):
        raise ValueError(f"fc init: aux hidden states have RMS {rms.tolist()}; cannot scale to it")
    return rms.tolist(), int(sink.sum())


@torch.no_grad()
def init_fc(
    draft,
    aux_hidden: torch.Tensor | None,
    positions: torch.Tensor | None = None,
    mode: str = "aux_rms",
    target_rms: float = 0.5,
    seed: int = 0,
) -> dict:
    """Redraw `draft.fc.weight` by `mode` (see the module docstring) from a seeded generator, so
    the init does not depend on what else drew from the global RNG. `aux_hidden` [T, 3·H] and
    `positions` [T] come from the first training batch (PackedBatch.aux_hidden / .positions); mode
    "normal" needs neither. Returns what was measured and set, for the log."""
    if mode not in FC_INITS:
        raise ValueError(f"fc_init must be one of {', '.join(FC_INITS)}, not {mode!r}")
    weight = draft.fc.weight  # [H, 3·H_target]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(weight.shape, generator=gen, dtype=torch.float32)
    if mode == "normal":
        weight.copy_(noise * NORMAL_STD)
        return {"fc_init": mode, "std": [NORMAL_STD] * 3}
    if not target_rms > 0:
        raise ValueError(f"fc_init_rms must be > 0, not {target_rms}")
    if aux_hidden is None:
        raise ValueError("fc init 'aux_rms' needs the aux hidden states of a batch")
    if aux_hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"aux_hidden is {aux_hidden.shape[-1]} wide, fc reads {weight.shape[1]} features"
        )
    rms, sinks = aux_chunk_rms(aux_hidden, positions)
    H = weight.shape[1] // 3
    c = target_rms / math.sqrt(3 * H)
    std = [c / r for r in rms]
    scale = torch.tensor(std).repeat_interleave(H)  # [3·H], one std per input feature
    weight.copy_(noise * scale[None, :])
    return {
        "fc_init": mode,
        "aux_rms": [round(r, 4) for r in rms],
        "sink_tokens": sinks,
        "std": [float(f"{s:.4g}") for s in std],
        "target_rms": target_rms,
    }
