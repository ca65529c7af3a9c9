"""Packed-row attention for Hugging Face targets: one row of several documents back to back, each
token attending causally within its own document only. The three paths, and the rule that picks
one, are described in specfast/targets/hf.py's docstring and `packed_attention_path`."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("specfast")

ATTENTION_PER_DOCUMENT = "specfast_per_document"
PACKED_PATHS = ("flash_varlen", "per_document", "dense")

# The automatic rule (see packed_attention_path): one SDPA call's fixed cost, in the (query, key)
# pairs per layer that the dense mask's attention handles in the same time (CPU, measured).
SDPA_CALL_COST_PAIRS = 512


def packed_attention_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, T, T] mask: causal within each document, nothing across documents."""
    t = torch.arange(doc_ids.numel(), device=doc_ids.device)
    allowed = (t[:, None] >= t[None, :]) & (doc_ids[:, None] == doc_ids[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own document (restarts at 0 at every boundary)."""
    t = torch.arange(doc_ids.numel(), device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[1:] = doc_ids[1:] != doc_ids[:-1]
    start_index = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=0).values
    return t - start_index


def document_bounds(doc_ids: torch.Tensor) -> list[int]:
    """[0, end of document 0, end of document 1, ..., T]: where each contiguous run of equal doc
    id starts, then T (the cumulative sequence lengths of flash-attn's varlen interface)."""
    starts = (doc_ids[1:] != doc_ids[:-1]).nonzero().flatten() + 1
    return [0, *starts.tolist(), doc_ids.numel()]


def flash_varlen_kwargs(bounds: list[int], device: torch.device) -> dict:
    """The forward kwargs of transformers' padding-free flash_attention_2 path (its
    FlashAttentionKwargs): what it would otherwise infer from the position ids in every layer."""
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


class MissingDocumentBounds(RuntimeError):
    """The model's forward did not hand `document_bounds` down to its attention layers."""


def per_document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_bounds: list[int] | tuple[int, ...] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (AttentionInterface): causal attention within each
    document of a packed row, one SDPA call per document. query [1, Hq, T, D], key and value
    [1, Hkv, T, D] (Hq a multiple of Hkv); returns ([1, T, Hq, D], None) as transformers expects.
    `document_bounds` (from `document_bounds`) comes through the model's forward kwargs; a model
    whose code drops them raises MissingDocumentBounds (forward_packed then falls back to the
    dense mask). A sliding window, where the model has one, applies within each document (a
    banded mask for documents longer than it)."""
    if document_bounds is None:
        raise MissingDocumentBounds(
            f"{type(module).__name__} did not receive document_bounds from the model's forward"
        )
    if softcap is not None:
        raise ValueError("per-document attention (like sdpa) does not support attention softcap")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError("per-document attention is causal; this layer is not")
    batch, heads, length, _ = query.shape
    if batch != 1 or document_bounds[-1] != length:
        raise ValueError(
            f"per-document attention takes one packed row of {document_bounds[-1]} tokens, "
            f"got query {tuple(query.shape)}"
        )
    gqa = heads != key.shape[1]
    out = query.new_empty(1, length, heads, value.shape[-1])
    for start, end in zip(document_bounds[:-1], document_bounds[1:]):
        q, k, v = (x[:, :, start:end] for x in (query, key, value))
        n = end - start
        if sliding_window is not None and n > sliding_window:  # keys q - k < window back
            i = torch.arange(n, device=query.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
            if gqa:
                k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scaling)
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa
            )
        out[:, start:end] = o.transpose(1, 2)
    return out, None


def _register_per_document_attention() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.48
        return False
    AttentionInterface.register(ATTENTION_PER_DOCUMENT, per_document_attention)
    return True


PER_DOCUMENT_AVAILABLE = _register_per_document_attention()


def flash_attn_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    return bool(is_flash_attn_2_available())


def packed_attention_path(
    num_tokens: int,
    num_docs: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    flash_available: bool,
    per_document_available: bool = True,
) -> tuple[str, str]:
    """(path, reason): how `HFTarget.forward_packed` runs a packed row of `num_tokens` tokens in
    `num_docs` documents. The rule:

    1. ``flash_varlen`` where flash-attn is installed, on CUDA, in fp16/bf16;
    2. else ``dense`` where (documents - 1) * SDPA_CALL_COST_PAIRS > T²: the per-document
       loop pays a fixed cost per SDPA call (documents calls a layer against the dense path's
       one), the dense mask a cost per (query, key) pair (T² a layer). Only short rows of tiny
       documents qualify (T < 512 and a mean document length of about 512 / T tokens or less:
       4 at T = 128); a single document never does, nor do ShareGPT rows;
    3. else ``per_document``.

    Measured on CPU (bench/results/target_forward-cpu-2core.md: SmolLM2-135M, fp32, one thread,
    a shared 2-core machine). Whole forward, dense vs per document: T = 8192 in 24 ShareGPT-like
    documents 186 s vs 56 s (3.3×), peak 1482 vs 1016 MiB; one 8192-token document 188 s vs
    114 s (1.65×); T = 2048 in 5 documents 19.4 s vs 13.1 s (1.5×), one document 1.3×; at
    T <= 512 the attention is a small part and the two are within 10% either way (dense 0.76 s
    vs 0.88 s at T = 128 in 1-token documents). One layer's attention alone, where the rule's
    constant comes from: dense wins at T = 128 in 1-token documents (0.71 vs 2.19 ms) and
    2-token documents (0.67 vs 1.21 ms); they tie at T = 128 in 4-token documents (32 · 512 =
    128²) and at T = 512 in 1-token documents (512 · 512 = 512²); per document wins by 1.2–12×
    everywhere else measured (T = 2048 ShareGPT-like: 295 vs 59 ms). On CUDA the rule is the
    same but unmeasured (no GPU here); with flash-attn installed it does not apply."""
    if flash_available and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash_varlen", "flash-attn installed, CUDA, half precision"
    if not per_document_available:
        return "dense", "this transformers has no AttentionInterface"
    if (num_docs - 1) * SDPA_CALL_COST_PAIRS > num_tokens**2:
        return "dense", f"(documents - 1) * {SDPA_CALL_COST_PAIRS} > T²: many tiny documents"
    return "per_document", "no T×T mask: one causal SDPA call per document"
