"""The Hugging Face target backend on the real embedded SmolLM2: teacher logits equal the model's own,
packed rows equal per-document runs, and the aux layers are the right hidden states."""
import pytest
import torch

from specfast.targets import HFTarget, aux_layer_ids_default


def test_default_aux_layers_match_vllm_convention():
    # 0-based layer outputs [1, L//2-1, L-4] are what vLLM calls the inputs of layers (2, L//2, L-3).
    assert aux_layer_ids_default(30) == [1, 14, 26]
    assert [i + 1 for i in aux_layer_ids_default(32)] == [2, 16, 29]
    with pytest.raises(ValueError, match="too shallow"):
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
    torch.testing.assert_close(out.aux_hidden, torch.cat([full.hidden_states[i][0] for i in (2, 15, 27)], -1))


def test_packed_row_equals_separate_documents(tiny_target_dir, seed):
    target = HFTarget(tiny_target_dir)
    lengths = [7, 1, 12, 5]
    docs = [torch.randint(0, target.vocab_size, (n,)) for n in lengths]
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    packed = target.forward_packed(torch.cat(docs), doc_ids)
    alone = [target.forward_packed(d, torch.zeros(len(d), dtype=torch.long)) for d in docs]
    torch.testing.assert_close(packed.aux_hidden, torch.cat([a.aux_hidden for a in alone]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.final_hidden, torch.cat([a.final_hidden for a in alone]), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.argmax, torch.cat([a.argmax for a in alone]))
