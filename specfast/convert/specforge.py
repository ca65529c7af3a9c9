"""SpecForge's offline hidden states (`scripts/prepare_hidden_states.py`): one `torch.save` dict per
sample, `*.ckpt` (or `*.ckpt.gz`), read in sorted order:

    input_ids         [L]            int64
    loss_mask         [L]            int64 0/1 (assistant tokens)
    hidden_state      [1, L, H]      the target's last hidden state after its final norm
    aux_hidden_state  [1, L, 3H]     outputs of 0-based layers [1, L//2 - 1, L - 4] (by default),
                                     concatenated in that order: specfast's own convention

SpecForge zeroes the last loss-mask token when it *reads* a sample; the stored mask is the data, so
it is converted as stored.
"""

from __future__ import annotations

from pathlib import Path

from specfast.conventions import AUX_LAYER_CONVENTION

from .common import hidden, list_files, load_pickled, sample, take, tokens


class TorchDictSource:
    """One pickled dict per sample (SpecForge's layout; AngelSlim's subclass renames keys)."""

    name = "specforge"
    suffixes = (".ckpt", ".ckpt.gz")
    final_keys = ("hidden_state",)
    aux_keys = ("aux_hidden_state",)
    layer_convention = AUX_LAYER_CONVENTION  # the source's ids are ours

    def __init__(self, root: Path, hidden_size: int, vocab_size: int, num_aux: int = 3):
        self.root = Path(root)
        self.hidden_size, self.vocab_size, self.num_aux = hidden_size, vocab_size, num_aux
        self.files = list_files(self.root, self.suffixes)

    def to_ours(self, layer_ids: list[int]) -> list[int]:
        return list(layer_ids)

    def default_layer_ids(self, num_layers: int) -> list[int]:
        return [1, num_layers // 2 - 1, num_layers - 4]

    def read(self, path: Path) -> dict:
        d = load_pickled(path)
        h = self.hidden_size
        return sample(
            path,
            tokens(take(d, ("input_ids",), path), "input_ids", path),
            tokens(take(d, ("loss_mask",), path), "loss_mask", path),
            hidden(take(d, self.aux_keys, path), self.aux_keys[0], self.num_aux * h, path),
            hidden(take(d, self.final_keys, path), self.final_keys[0], h, path),
            self.vocab_size,
        )
