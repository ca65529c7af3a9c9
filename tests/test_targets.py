"""The Hugging Face target backend on the real embedded SmolLM2: teacher logits equal the model's
own, packed rows equal per-document runs, the aux layers are the right hidden states, and the
decoding methods (cached forward with cropping, generate) agree with a plain forward."""

import pytest
import torch

from specfast.conventions import aux_ids_to_vllm, aux_layer_ids_default
from specfast.targets import HFTarget


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


def test_packed_row_equals_separate_documents(tiny_target_dir, seed):
    target = HFTarget(tiny_target_dir)
    lengths = [7, 1, 12, 5]
    docs = [torch.randint(0, target.vocab_size, (n,)) for n in lengths]
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    packed = target.forward_packed(torch.cat(docs), doc_ids)
    alone = [target.forward_packed(d, torch.zeros(len(d), dtype=torch.long)) for d in docs]
    for field in ("aux_hidden", "final_hidden"):
        torch.testing.assert_close(
            getattr(packed, field),
            torch.cat([getattr(a, field) for a in alone]),
            rtol=1e-5,
            atol=1e-5,
        )
    assert torch.equal(packed.argmax, torch.cat([a.argmax for a in alone]))


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
