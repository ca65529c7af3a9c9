"""fc init (specfast/model/init.py): scaled to the measured aux RMS, sinks left out."""

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
