"""`train --init-from`: a published EAGLE-3 draft (specfast's export, SpecForge's layout, the
speculators layout) continues training on prepared data: its weights come through unchanged, so its
first evaluation gives the original's τ; its lm_head rows follow the token ids when the prepared
draft vocabulary differs; a draft for another target is refused."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from specfast.data.prepared import PreparedData
from specfast.data.vocab import DraftVocab
from specfast.eval.evaluate import evaluate
from specfast.eval.prompts import read_prompts
from specfast.export import export_draft
from specfast.model.checkpoint_files import save_draft_weights
from specfast.model.load import load_draft, new_draft
from specfast.targets import load_target

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    return load_target(str(tiny_target_dir), device="cpu")


@pytest.fixture(scope="module")
def published(tmp_path_factory, target, tiny_prepared):
    """A draft with non-trivial weights, exported in the vLLM layout and the speculators layout."""
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(3)
    draft = new_draft(target, PreparedData.load(tiny_prepared).vocab, True, CPU)
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    (root / "ckpt").mkdir()
    save_draft_weights(draft, root / "ckpt")
    vllm = export_draft(root / "ckpt", root / "vllm")
    spec = export_draft(root / "ckpt", root / "spec", fmt="speculators", verifier="tiny")
    return vllm, spec


def weights(draft) -> dict:
    return {k: v.detach().cpu() for k, v in draft.trainable_state_dict().items()}


def tau(target, draft, prompts) -> float:
    r = evaluate(target, draft, prompts, 3, 0.0, 24, baseline=False, progress=False)
    return r["acceptance_length"]


def test_continued_draft_is_the_original_and_evaluates_alike(target, tiny_prepared, published):
    vllm, spec = published
    vocab = PreparedData.load(tiny_prepared).vocab
    original = load_draft(vllm, target)
    want = weights(original)
    for folder in (vllm, spec):
        got = weights(new_draft(target, vocab, False, CPU, init_from=folder))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (folder.name, k)
    prompts = read_prompts(tiny_prepared / "heldout.jsonl", limit=2)
    continued = new_draft(target, vocab, False, CPU, init_from=vllm).eval().requires_grad_(False)
    assert tau(target, continued, prompts) == tau(target, original, prompts)


def test_specforge_layout_without_aux_ids_uses_the_target_default(
    tmp_path, target, tiny_prepared, published
):
    """SpecForge's export: the same tensors plus the target's embed_tokens, a Llama-style
    config with draft_vocab_size and no aux layer ids (it trains on EAGLE-3's default)."""
    vllm, _ = published
    c = json.loads((vllm / "config.json").read_text())
    for k in ("specfast", "eagle_config", "eagle_aux_hidden_state_layer_ids"):
        c.pop(k)
    folder = tmp_path / "specforge_export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(c))
    tensors = load_file(str(vllm / "model.safetensors"))
    tensors["embed_tokens.weight"] = target.embed_weight().to(torch.bfloat16).contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    vocab = PreparedData.load(tiny_prepared).vocab
    got = weights(new_draft(target, vocab, False, CPU, init_from=folder))
    want = weights(load_draft(vllm, target))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_other_draft_vocabulary_is_mapped_by_token_id(target, tiny_prepared, published):
    vllm, _ = published
    original = weights(load_draft(vllm, target))
    old_ids = PreparedData.load(tiny_prepared).vocab.draft_ids
    outside = np.setdiff1d(np.arange(target.vocab_size), old_ids.numpy())[:20]
    new_ids = torch.from_numpy(np.union1d(old_ids.numpy()[::2], outside))  # half kept, 20 new
    vocab = DraftVocab(new_ids, target.vocab_size, float("nan"))
    got = weights(new_draft(target, vocab, False, CPU, init_from=vllm))
    assert torch.equal(got["d2t"] + torch.arange(len(new_ids)), new_ids)
    head, old_head = got["lm_head.weight"], original["lm_head.weight"]
    for i, t in enumerate(new_ids.tolist()):
        hit = (old_ids == t).nonzero()
        if len(hit):  # the published row of the same token
            assert torch.equal(head[i], old_head[int(hit)]), t
        else:  # a fresh row (std 0.02 init), none of the published ones
            assert 0.01 < float(head[i].std()) < 0.04, t
            assert not bool((old_head == head[i]).all(dim=1).any()), t
    for k in original:
        if k not in ("lm_head.weight", "d2t", "t2d"):
            assert torch.equal(got[k], original[k]), k


def test_draft_for_another_target_is_refused(tmp_path, tiny_target_dir, tiny_prepared, published):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    vllm, _ = published
    cfg = AutoConfig.from_pretrained(tiny_target_dir)
    cfg.hidden_size, cfg.head_dim = 48, 12
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wider")
    AutoTokenizer.from_pretrained(tiny_target_dir).save_pretrained(tmp_path / "wider")
    wider = load_target(str(tmp_path / "wider"), device="cpu")
    vocab = PreparedData.load(tiny_prepared).vocab
    with pytest.raises(ValueError, match="target hidden size 32, target has 48"):
        new_draft(wider, vocab, False, CPU, init_from=vllm)
