"""specfast.integrations.specforge: SpecForge 0.2.0's EAGLE-3 training step on specfast's fused
loss and TTT attention gives the same per-step losses, accuracies and gradients as SpecForge's own
step (on CPU its Triton loss is swapped for its own reference, as its CPU runs need). Skipped
where SpecForge is not installed (bench/specforge_side.py --setup makes a venv that has it)."""

import pytest
import torch

specforge = pytest.importorskip("specforge", reason="SpecForge 0.2.0 is not installed here")


@pytest.fixture
def cpu_specforge(monkeypatch):
    """SpecForge's CPU stand-ins: its reference loss for the Triton one, eager (uncompiled)."""
    import specforge.algorithms.eagle3.model as em
    import specforge.core.loss as loss_mod

    import specfast.integrations.specforge as sf

    ref = loss_mod._compute_loss
    ref = getattr(ref, "_torchdynamo_orig_callable", ref)

    class ReferenceLoss:
        apply = staticmethod(ref)

    monkeypatch.setattr(em, "LogSoftmaxLoss", ReferenceLoss)
    fn = em._compute_target_p
    monkeypatch.setattr(em, "_compute_target_p", getattr(fn, "_torchdynamo_orig_callable", fn))
    yield sf
    sf.unpatch()


def tiny_model(ttt: int, seed: int = 0):
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    cfg.draft_vocab_size = 40
    torch.manual_seed(seed)
    draft = LlamaForCausalLMEagle3(cfg, attention_backend="sdpa").float()
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.2)
        ids = torch.sort(torch.randperm(96)[:40]).values
        draft.d2t.copy_(ids - torch.arange(40))
        draft.t2d.zero_()
        draft.t2d[ids] = True
    return OnlineEagle3Model(draft_model=draft, length=ttt, attention_backend="sdpa")


def batch(seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    loss_mask = (torch.rand(1, seq, 1, generator=g) < 0.7).long()  # [B, L, 1], as its strategy
    loss_mask[0, -1] = 0
    return dict(
        input_ids=torch.randint(0, 96, (1, seq), generator=g),
        attention_mask=torch.ones(1, seq, dtype=torch.long),
        target=torch.randn(1, seq, 96, generator=g) * 3,
        loss_mask=loss_mask,
        hidden_states=torch.randn(1, seq, 96, generator=g),
    )


def step(model, inputs):
    """Forward, the strategy's weighted loss Σ 0.8^k · loss_k, backward: (losses, accs, grads)."""
    model.zero_grad(set_to_none=True)
    losses, _, accs, *_ = model(**inputs)
    total = sum(0.8**k * loss for k, loss in enumerate(losses))
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack([x.detach() for x in losses]), torch.stack(accs), grads


@pytest.mark.parametrize("seq,ttt", [(37, 3), (64, 7)])
def test_patched_step_equals_specforge_step(cpu_specforge, monkeypatch, seq, ttt):
    import specfast.kernels as kernels

    calls = {"pruned_vocab_loss": 0, "ttt_attention": 0}

    def counting(name):  # the patched step must run on the kernels
        kernel = getattr(kernels, name)

        def counted(*a, **k):
            calls[name] += 1
            return kernel(*a, **k)

        return counted

    for name in calls:
        monkeypatch.setattr(kernels, name, counting(name))
    sf = cpu_specforge
    model, inputs = tiny_model(ttt), batch(seq, seed=seq)
    want = step(model, inputs)
    assert calls == {"pruned_vocab_loss": 0, "ttt_attention": 0}
    sf.patch()
    got = step(model, inputs)
    assert calls == {"pruned_vocab_loss": ttt, "ttt_attention": ttt}
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1])
    assert got[2].keys() == want[2].keys() and "draft_model.fc.weight" in got[2]
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-6, msg=name)
    sf.unpatch()
    again = step(model, inputs)  # unpatch restores SpecForge's own step
    torch.testing.assert_close(again[0], want[0], rtol=0, atol=0)


def test_patch_is_confined_to_the_training_forward(cpu_specforge):
    sf = cpu_specforge
    model = tiny_model(2)
    sf.patch()
    h = torch.randn(1, 5, 32)
    logits = model.draft_model.compute_logits(h)  # outside the training step: real logits
    assert isinstance(logits, torch.Tensor) and logits.shape == (1, 5, 40)
