"""Draft init: fc scaled to the measured aux RMS (sinks left out), and the head started from the
target's rows with its norm scaled to unit logits (specfast/model/init.py, model/draft.py)."""

import pytest
import torch
from torch import nn

from specfast.model.init import aux_chunk_rms, init_fc


class _Fc(nn.Module):
    def __init__(self, h_target: int, h: int):
        super().__init__()
        self.fc = nn.Linear(3 * h_target, h, bias=False)
        nn.init.normal_(self.fc.weight, std=0.02)


def _aux(T=400, H=64, scales=(3.0, 6.0, 20.0), docs=(0, 150, 300), sink=1000.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    aux = torch.cat([torch.randn(T, H, generator=g) * s for s in scales], dim=1)
    positions = torch.arange(T)
    for start in docs:
        positions[start:] = torch.arange(T - start)
        aux[start] = torch.randn(3 * H, generator=g) * sink  # the attention sink opens a document
    return aux, positions


def test_chunk_rms_leaves_out_sinks():
    aux, pos = _aux()
    rms, sinks = aux_chunk_rms(aux, pos)
    assert sinks == 3
    assert rms == pytest.approx([3.0, 6.0, 20.0], rel=0.05)
    # Without positions the sinks are still found by size.
    rms2, sinks2 = aux_chunk_rms(aux)
    assert sinks2 == 3 and rms2 == pytest.approx(rms, rel=1e-6)
    # Counted in, they would set the scale.
    everything = aux.reshape(400, 3, 64).pow(2).mean((0, 2)).sqrt()
    assert float(everything[0]) > 5 * rms[0]


def test_aux_rms_init_sets_output_rms_and_equal_chunk_shares():
    aux, pos = _aux()
    m = _Fc(64, 96)
    with torch.no_grad():
        before = float(m.fc(aux).pow(2).mean().sqrt())
    info = init_fc(m, aux, pos, "aux_rms", target_rms=0.5, seed=1)
    keep = pos != 0
    with torch.no_grad():
        out = m.fc(aux[keep])
        out_rms = float(out.pow(2).mean().sqrt())
        w = m.fc.weight
        shares = [
            float(
                (aux[keep, j * 64 : (j + 1) * 64] @ w[:, j * 64 : (j + 1) * 64].t()).pow(2).mean()
            )
            for j in range(3)
        ]
    assert before > 5  # the generic init: fc(aux) swamps everything
    assert out_rms == pytest.approx(0.5, rel=0.1)
    assert max(shares) / min(shares) < 1.3
    assert info["sink_tokens"] == 3 and len(info["std"]) == 3
    assert info["std"][0] > info["std"][2]  # the quiet layer gets the larger weights


def test_init_is_seeded_and_normal_mode_is_the_old_init():
    aux, pos = _aux()
    a, b = _Fc(64, 32), _Fc(64, 32)
    torch.manual_seed(123)
    init_fc(a, aux, pos, seed=7)
    torch.manual_seed(456)  # the global RNG does not matter
    init_fc(b, aux, pos, seed=7)
    assert torch.equal(a.fc.weight, b.fc.weight)
    init_fc(a, None, mode="normal", seed=3)
    assert float(a.fc.weight.std()) == pytest.approx(0.02, rel=0.05)


def test_init_rejects_bad_input():
    aux, pos = _aux()
    m = _Fc(64, 32)
    with pytest.raises(ValueError, match="fc_init must be one of"):
        init_fc(m, aux, pos, mode="xavier")
    with pytest.raises(ValueError, match="needs the aux hidden"):
        init_fc(m, None)
    with pytest.raises(ValueError, match="wide"):
        init_fc(_Fc(32, 8), aux, pos)
    with pytest.raises(ValueError, match=r"\[T, 3·H\]"):
        aux_chunk_rms(aux[:, :100])
    with pytest.raises(ValueError, match="> 0"):
        init_fc(m, aux, pos, target_rms=0.0)
    with pytest.raises(ValueError, match="RMS"):
        init_fc(m, torch.zeros(10, 192))


def test_init_from_target_copies_head_rows_and_scales_norm_to_unit_logits():
    from specfast.model import DraftConfig, Eagle3Draft

    vocab, draft_vocab, hidden = 300, 37, 48
    cfg = DraftConfig(
        hidden_size=hidden,
        target_hidden_size=hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=64,
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        aux_layer_ids=[1, 2, 3],
        rope_theta=100.0,
    )
    draft = Eagle3Draft(cfg)
    ids = torch.randperm(vocab)[:draft_vocab].sort().values
    draft.set_vocab(ids)
    head = torch.randn(vocab, hidden) * (0.05 + torch.rand(vocab, 1))  # uneven row norms
    norm = 1.0 + torch.rand(hidden) * 2  # a trained norm: logits far above unit std
    draft.attach_target(torch.randn(vocab, hidden), head, norm)
    assert torch.equal(draft.lm_head.weight, head[ids])
    # The norm keeps the target's shape, only scaled ...
    ratio = draft.norm.weight / norm
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and 0 < ratio[0] < 1
    # ... so that a unit-RMS hidden state gives logits of unit std on average over the rows.
    h = torch.randn(20000, hidden)
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt()
    logits = (h * draft.norm.weight) @ draft.lm_head.weight.T
    assert logits.std(0).mean().item() == pytest.approx(1.0, rel=0.05)
    without = (h * norm) @ head[ids].T
    assert without.std(0).mean().item() > 3


def test_init_logit_scale_is_the_inverse_mean_row_norm():
    from specfast.model.draft import init_logit_scale

    head = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # row norms 5 and 1 with a unit norm weight
    assert init_logit_scale(head, torch.ones(2)) == pytest.approx(1 / 3)
    assert init_logit_scale(head, torch.full((2,), 2.0)) == pytest.approx(1 / 6)
