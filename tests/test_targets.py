"""The Hugging Face target backend on the real embedded SmolLM2: teacher logits equal the model's
own, packed rows equal per-document runs, the aux layers are the right hidden states, and the
decoding methods (cached forward with cropping, generate) agree with a plain forward."""

import logging

import pytest
import torch
from specfast.kernels import full_vocab_argmax

from specfast.conventions import aux_ids_to_vllm, aux_layer_ids_default
from specfast.targets import HFTarget
from specfast.targets.packed import (
    PACKED_PATHS,
    document_bounds,
    flash_attn_available,
    flash_varlen_kwargs,
    packed_attention_path,
    per_document_attention,
    positions_in_documents,
)


def test_default_aux_layers_match_vllm_convention():
    # 0-based layer outputs [1, L//2-1, L-4] are what vLLM calls the inputs of layers
    # (2, L//2, L-3).
    assert aux_layer_ids_default(30) == [1, 14, 26]
    assert aux_ids_to_vllm(aux_layer_ids_default(32)) == [2, 16, 29]
    with pytest.raises(ValueError, match="shallow"):
        aux_layer_ids_default(6)  # [1, 2, 2]: vLLM would de-duplicate it to two layers


def test_teacher_logits_equal_the_targets_own_logits(smollm2_dir, seed):
    target = HFTarget(smollm2_dir)
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (30, 576, 49152)
    ids = torch.randint(0, target.vocab_size, (40,))
    out = target.forward_packed(ids, torch.zeros(40, dtype=torch.long))
    with torch.no_grad():
        full = target.model(ids[None], output_hidden_states=True)
    draft_ids = torch.randperm(target.vocab_size)[:300].sort().values
    teacher = target.teacher_logits(out.final_hidden, draft_ids)
    torch.testing.assert_close(teacher, full.logits[0][:, draft_ids].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax, full.logits[0].argmax(-1))
    # aux = outputs of layers 1, 14, 26 = HF hidden_states[2], [15], [27]
    torch.testing.assert_close(
        out.aux_hidden, torch.cat([full.hidden_states[i][0] for i in (2, 15, 27)], -1)
    )


def _path_or_skip(path: str) -> tuple[str, torch.dtype]:
    """(device, dtype) to run `path` on, or skip where this machine cannot run it."""
    if path != "flash_varlen":
        return "cpu", torch.float32
    if not flash_attn_available():
        pytest.skip("flash-attn is not installed (an optional extra)")
    if not torch.cuda.is_available():
        pytest.skip("flash-attn's varlen kernel needs CUDA")
    return "cuda", torch.bfloat16


@pytest.mark.parametrize("path", PACKED_PATHS)
def test_packed_row_equals_separate_documents(tiny_target_dir, seed, path):
    """Every packed path equals the model run on each document alone (the tiny target has 4
    query heads on 2 KV heads: GQA), for odd lengths and single-token documents."""
    device, dtype = _path_or_skip(path)
    target = HFTarget(tiny_target_dir, device=device, dtype=dtype, packed_attention=path)
    lengths = [7, 1, 12, 5, 1, 33, 2]
    docs = [torch.randint(0, target.vocab_size, (n,)) for n in lengths]
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    packed = target.forward_packed(torch.cat(docs), doc_ids)
    assert target.model.config._attn_implementation == "sdpa"  # switched back after the call
    with torch.no_grad():  # the reference: transformers' own forward, one document at a time
        alone = [
            target.model.base_model(d[None].to(device), output_hidden_states=True) for d in docs
        ]
    final = torch.cat([a.last_hidden_state[0] for a in alone])
    aux = torch.cat([target._aux(a.hidden_states)[0] for a in alone])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(packed.final_hidden, final, **tol)
    torch.testing.assert_close(packed.aux_hidden, aux, **tol)
    argmax = full_vocab_argmax(final, target.lm_head_weight())
    if dtype == torch.float32:
        assert torch.equal(packed.argmax, argmax)
    else:  # bf16 rounding may flip near-ties
        assert (packed.argmax == argmax).float().mean() > 0.9
    # and the same as forward_packed on each document alone
    singles = [target.forward_packed(d, torch.zeros(len(d), dtype=torch.long)) for d in docs]
    torch.testing.assert_close(
        packed.final_hidden, torch.cat([s.final_hidden for s in singles]), **tol
    )


def test_flash_varlen_kwargs_are_what_transformers_infers_from_positions():
    """The flash path hands transformers the boundaries it would infer from the restarting
    position ids itself (flash-attn is not installed here: this is the part testable on CPU)."""
    fa_utils = pytest.importorskip("transformers.modeling_flash_attention_utils")
    lengths = [7, 1, 12, 5, 1, 33, 2]
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    got = flash_varlen_kwargs(document_bounds(doc_ids), torch.device("cpu"))
    (cu_q, cu_k), (max_q, max_k) = fa_utils.prepare_fa_kwargs_from_position_ids(
        positions_in_documents(doc_ids)[None]
    )
    assert torch.equal(got["cu_seq_lens_q"], cu_q) and torch.equal(got["cu_seq_lens_k"], cu_k)
    assert got["cu_seq_lens_q"].dtype == torch.int32
    assert got["max_length_q"] == got["max_length_k"] == int(max_q) == int(max_k) == 33


def test_per_document_path_builds_no_row_sized_attention(tiny_target_dir, monkeypatch):
    """Per document, every SDPA call sees one document and no mask: nothing of size T×T."""
    target = HFTarget(tiny_target_dir, packed_attention="per_document")
    lengths = [9, 1, 20, 4]
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[-2], k.shape[-2], attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    doc_ids = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    target.forward_packed(torch.randint(0, 100, (34,)), doc_ids)
    assert len(calls) == len(lengths) * target.num_layers
    assert [c[:2] for c in calls[:4]] == [(n, n) for n in lengths]
    assert all(mask is None for *_, mask in calls)


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
@pytest.mark.parametrize("window", [None, 3])
def test_per_document_attention_equals_block_diagonal_mask(heads, kv_heads, window, seed):
    """The attention function alone, against SDPA with the dense block-diagonal causal mask (and
    the sliding window within each document where there is one): GQA and MHA."""
    lengths = [5, 1, 8, 2, 1]
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    T, D = bounds[-1], 16
    q = torch.randn(1, heads, T, D)
    k, v = torch.randn(1, kv_heads, T, D), torch.randn(1, kv_heads, T, D)
    module = torch.nn.Module()
    got, _ = per_document_attention(
        module, q, k, v, None, scaling=0.3, document_bounds=bounds, sliding_window=window
    )
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t = torch.arange(T)
    allowed = (t[:, None] >= t[None, :]) & (doc[:, None] == doc[None, :])
    if window is not None:
        allowed &= t[:, None] - t[None, :] < window
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed, scale=0.3
    )
    assert got.shape == (1, T, heads, D)
    torch.testing.assert_close(got, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_model_that_drops_document_bounds_falls_back_to_dense(tiny_target_dir, caplog):
    """A model whose forward does not hand `document_bounds` down to attention cannot run per
    document: forward_packed says so once and uses the dense mask instead of a wrong answer."""
    target = HFTarget(tiny_target_dir)
    dense = HFTarget(tiny_target_dir, packed_attention="dense")
    forward = target.model.base_model.forward

    def dropping(*args, document_bounds=None, **kwargs):
        return forward(*args, **kwargs)

    target.model.base_model.forward = dropping
    ids = torch.randint(0, 100, (40,))
    doc_ids = torch.repeat_interleave(torch.arange(2), torch.tensor([15, 25]))
    with caplog.at_level(logging.WARNING, logger="specfast"):
        got = target.forward_packed(ids, doc_ids)
    assert "did not receive document_bounds" in caplog.text
    torch.testing.assert_close(got.final_hidden, dense.forward_packed(ids, doc_ids).final_hidden)
    assert target.packed_path(40, 2) == "dense"


def test_argmax_rows_computes_exactly_those_rows(tiny_target_dir, seed, monkeypatch):
    import specfast.targets.base as base

    target = HFTarget(tiny_target_dir)
    ids = torch.randint(0, target.vocab_size, (30,))
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 1, 18]))
    full = target.forward_packed(ids, doc_ids)
    rows_seen = []

    def counting_argmax(hidden, weight):
        rows_seen.append(hidden.shape[0])
        return full_vocab_argmax(hidden, weight)

    monkeypatch.setattr(base, "full_vocab_argmax", counting_argmax)
    rows = torch.rand(30) < 0.4
    rows[11] = True  # the single-token document
    some = target.forward_packed(ids, doc_ids, argmax_rows=rows)
    assert rows_seen == [int(rows.sum())]
    assert torch.equal(some.argmax[rows], full.argmax[rows])
    assert (some.argmax[~rows] == -1).all() and some.argmax.dtype == torch.int64
    torch.testing.assert_close(some.final_hidden, full.final_hidden)
    none = target.forward_packed(ids, doc_ids, argmax_rows=torch.zeros(30, dtype=torch.bool))
    assert (none.argmax == -1).all() and rows_seen[-1] == 0
    with pytest.raises(ValueError, match="bool"):
        target.forward_packed(ids, doc_ids, argmax_rows=torch.ones(30, dtype=torch.long))


def test_automatic_packed_path_rule(tiny_target_dir, caplog):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def rule(tokens, docs, device=cpu, dtype=torch.float32, flash=False):
        path, _ = packed_attention_path(
            tokens, docs, device=device, dtype=dtype, flash_available=flash
        )
        return path

    assert rule(8192, 22) == rule(2048, 1) == rule(512, 2) == "per_document"
    assert rule(128, 128) == rule(64, 16) == "dense"  # short rows of tiny documents
    assert rule(128, 32) == rule(512, 512) == rule(8192, 8192) == "per_document"  # ties
    assert rule(20, 1) == rule(1, 1) == "per_document"  # one document: one call, no mask
    assert rule(512, 4, cuda, torch.bfloat16, flash=True) == "flash_varlen"
    assert rule(512, 4, cpu, torch.bfloat16, flash=True) == "per_document"
    assert rule(512, 4, cuda, torch.float32, flash=True) == "per_document"
    # chosen per row, each choice logged once
    target = HFTarget(tiny_target_dir)
    with caplog.at_level(logging.INFO, logger="specfast"):
        for _ in range(2):
            target.forward_packed(torch.arange(20), torch.zeros(20, dtype=torch.long))
            target.forward_packed(torch.arange(20), torch.arange(20))
    chosen = [r.getMessage() for r in caplog.records if "packed target forward" in r.getMessage()]
    assert len(chosen) == 2
    assert "per_document" in chosen[0] and "dense" in chosen[1]


def test_cached_forward_with_crop_equals_one_forward(tiny_target_dir, seed):
    """Speculative decoding's use of the cache: read some tokens, read more plus rejected guesses,
    crop the guesses away, read on. Logits and aux states equal one uncached forward."""
    target = HFTarget(tiny_target_dir)
    ids = torch.randint(0, target.vocab_size, (20,)).tolist()
    ref = target.forward_packed(torch.tensor(ids), torch.zeros(20, dtype=torch.long))
    ref_logits = target.teacher_logits(ref.final_hidden, torch.arange(target.vocab_size))
    cache = target.new_cache()
    target.forward_cached(ids[:12], cache)
    logits, aux = target.forward_cached(
        ids[12:16] + [7, 8, 9], cache, with_aux=True, logits_to_keep=7
    )
    torch.testing.assert_close(logits[:4], ref_logits[12:16], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux[0, :4], ref.aux_hidden[12:16], rtol=1e-4, atol=1e-4)
    assert len(cache) == 19
    cache.crop(16)
    logits, aux = target.forward_cached(ids[16:], cache, with_aux=True, logits_to_keep=4)
    assert len(cache) == 20 and aux.shape == (1, 4, 3 * target.hidden_size)
    torch.testing.assert_close(logits, ref_logits[16:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux[0], ref.aux_hidden[16:], rtol=1e-4, atol=1e-4)


def test_generate_is_greedy_and_leaves_the_tokenizer_alone(tiny_target_dir):
    target = HFTarget(tiny_target_dir)
    before = target.tokenizer_hash()
    prompt = target.tokenizer("Hello there, how are you?")["input_ids"]
    (got,) = target.generate([prompt], max_new_tokens=6)
    seq, cache = [], target.new_cache()
    logits, _ = target.forward_cached(prompt, cache)
    while len(seq) < 6 and (not seq or seq[-1] not in target.eos_token_ids()):
        seq.append(int(logits[-1].argmax()))
        logits, _ = target.forward_cached(seq[-1:], cache)
    assert got == seq
    # A batch of unequal prompts is padded without touching the tokenizer (its hash is recorded
    # by prepare and checked by train).
    answers = target.generate([prompt, prompt[:3]], max_new_tokens=4, temperature=0.7)
    assert len(answers) == 2 and all(1 <= len(a) <= 4 for a in answers)
    assert target.tokenizer_hash() == before


def test_generate_batches_unequal_prompts_and_drops_finished_rows(tiny_target_dir, monkeypatch):
    # The reference: HF's own greedy generate, to a fixed length. Then a token that one row
    # produces early is made an EOS: that row leaves the batch there, the others go on unchanged.
    target = HFTarget(tiny_target_dir)
    tok = target.tokenizer
    prompts = [tok(t)["input_ids"] for t in ("Hi", "What is two plus two, please?", "The cat sat")]
    width, pad, n = max(map(len, prompts)), tok.pad_token_id, 12
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]
    ref = target.model.generate(
        input_ids=ids, attention_mask=mask.long(), max_new_tokens=n, min_new_tokens=n,
        do_sample=False, pad_token_id=pad,
    )[:, width:].tolist()  # fmt: skip
    stop = ref[1][3]  # row 1 ends after 4 tokens
    monkeypatch.setattr(target, "eos_token_ids", lambda: {stop})
    got = target.generate(prompts, max_new_tokens=n)
    for row, ans in zip(ref, got):
        assert ans == (row[: row.index(stop) + 1] if stop in row else row)
    assert len(got[1]) <= 4
