"""AngelSlim's offline hidden states (`tools/generate_hidden_for_draft_model.py`): one `torch.save`
dict per sample, `rows_<a>-<b>/data_<i>.ckpt` under one folder per rank:

    input_ids       [1, L]       loss_mask [1, L]
    hidden_states   [1, L, 3H]   aux states: HF `hidden_states[i + 1]` for 0-based layers
                                 [1, L//2 - 1, L - 4] by default (layer outputs, ours)
    target_hiddens  [1, L, H]    HF `hidden_states[-1]`: after the final norm

The same layout as SpecForge's, under other key names (SpecForge's names are accepted too).
"""

from __future__ import annotations

from .specforge import TorchDictSource


class AngelSlimSource(TorchDictSource):
    name = "angelslim"
    suffixes = (".ckpt",)
    final_keys = ("target_hiddens", "hidden_state")
    aux_keys = ("hidden_states", "aux_hidden_state")
