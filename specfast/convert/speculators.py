"""speculators' offline hidden states, extracted by vLLM (`extract_hidden_states`): one safetensors
file per sample, `hs_<i>.safetensors` (in SRC or SRC/hidden_states/):

    hidden_states  [L, K + 1, H]   vLLM's captured layers: K aux states, then the last decoder
                                   layer's output *before* the final norm (speculators applies
                                   the verifier's norm itself); vLLM's ids name a layer's *input*
                                   (default [2, L//2, L - 3] plus L), ours are those minus 1
    token_ids      [L]

The loss mask is not in those files: it is column `loss_mask` of row i of the preprocessed Arrow
dataset in SRC (`datasets.save_to_disk`), whose `input_ids` must equal `token_ids`. A file that
carries its own `loss_mask` tensor uses it. The older `*.pt` layout (`torch.save` of `input_ids`,
`loss_mask` and `hidden_states`, a list of K + 1 [L, H] tensors, the same layers) is read too.

specfast stores the final hidden state after the target's norm, so the last slice goes through
the target's final RMSNorm here (in fp32).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from specfast.conventions import aux_ids_from_vllm

from .common import SampleError, hidden, list_files, load_pickled, natural_key, sample, tokens

HS_FILE = re.compile(r"^hs_(\d+)\.safetensors$")


class SpeculatorsSource:
    name = "speculators"
    layer_convention = "vllm_layer_input"  # id j = input of layer j = output of layer j - 1

    def __init__(
        self,
        root: Path,
        hidden_size: int,
        vocab_size: int,
        final_norm,
        num_aux: int = 3,
    ):
        """`final_norm`: the target's final norm, [L, H] fp32 -> [L, H]."""
        self.root = Path(root)
        self.hidden_size, self.vocab_size, self.num_aux = hidden_size, vocab_size, num_aux
        self.final_norm = final_norm
        folder = self.root / "hidden_states" if (self.root / "hidden_states").is_dir() else None
        hs = [
            p for p in list_files(folder or self.root, (".safetensors",)) if HS_FILE.match(p.name)
        ]
        pts = list_files(self.root, (".pt",))
        if hs and pts:
            raise ValueError(
                f"{self.root}: holds both hs_<i>.safetensors and *.pt samples; convert one layout"
            )
        self.files = sorted(hs, key=natural_key) if hs else pts
        self._dataset = None

    def to_ours(self, layer_ids: list[int]) -> list[int]:
        return aux_ids_from_vllm(layer_ids)

    def default_layer_ids(self, num_layers: int) -> list[int]:
        return [2, num_layers // 2, num_layers - 3]

    # -- the loss masks of the safetensors layout

    def _rows(self):
        if self._dataset is None:
            try:
                from datasets import load_from_disk
            except ImportError:
                raise ValueError(
                    f"{self.root}: the hs_<i>.safetensors files carry no loss mask; it is in the "
                    "preprocessed Arrow dataset there, which needs the `datasets` package "
                    "(pip install datasets)"
                ) from None
            try:
                self._dataset = load_from_disk(str(self.root))
            except FileNotFoundError as e:
                raise ValueError(
                    f"{self.root}: no preprocessed dataset with the loss masks ({e})"
                ) from None
            if "loss_mask" not in self._dataset.column_names:
                raise ValueError(f"{self.root}: the dataset has no loss_mask column")
        return self._dataset

    def _loss_mask(self, path: Path, index: int, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows()
        if index >= len(rows):
            raise SampleError(f"{path}: no row {index} in the dataset of {self.root}")
        row = rows[index]
        ids = torch.as_tensor(row["input_ids"])
        if ids.shape != token_ids.shape or not torch.equal(ids.long(), token_ids.long()):
            raise SampleError(f"{path}: token_ids differ from input_ids of dataset row {index}")
        return torch.as_tensor(row["loss_mask"])

    # -- one sample

    def read(self, path: Path) -> dict:
        h, k = self.hidden_size, self.num_aux
        if path.suffix == ".pt":
            d = load_pickled(path)
            layers = d.get("hidden_states")
            if not isinstance(layers, (list, tuple)) or len(layers) != k + 1:
                raise SampleError(
                    f"{path}: hidden_states must be a list of {k + 1} [L, {h}] tensors "
                    f"({k} aux layers, then the last layer)"
                )
            if not all(isinstance(t, torch.Tensor) for t in layers):
                raise SampleError(f"{path}: hidden_states holds something other than tensors")
            states = [hidden(t, f"hidden_states[{i}]", h, path) for i, t in enumerate(layers)]
            if len({len(s) for s in states}) != 1:
                raise SampleError(f"{path}: hidden_states layers differ in length")
            ids = tokens(_tensor(d, "input_ids", path), "input_ids", path)
            mask = tokens(_tensor(d, "loss_mask", path), "loss_mask", path)
            aux, last = torch.cat(states[:k], dim=-1), states[k]
        else:
            d = _read_safetensors(path)
            hs = _tensor(d, "hidden_states", path)
            if hs.dim() != 3 or hs.shape[1] != k + 1 or hs.shape[2] != h:
                raise SampleError(
                    f"{path}: hidden_states has shape {list(hs.shape)}, expected [L, {k + 1}, {h}]"
                )
            hs = hidden(hs.reshape(hs.shape[0], -1), "hidden_states", (k + 1) * h, path)
            ids = tokens(_tensor(d, "token_ids", path), "token_ids", path)
            if "loss_mask" in d:
                mask = tokens(d["loss_mask"], "loss_mask", path)
            else:
                index = int(HS_FILE.match(path.name).group(1))
                mask = tokens(self._loss_mask(path, index, ids), "loss_mask", path)
            aux, last = hs[:, : k * h], hs[:, k * h :]
        return sample(path, ids, mask, aux, self.final_norm(last.float()), self.vocab_size)


def _tensor(d: dict, key: str, path: Path) -> torch.Tensor:
    if not isinstance(d.get(key), torch.Tensor):
        raise SampleError(f"{path}: missing tensor {key!r} (has {sorted(d)})")
    return d[key]


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise SampleError(f"{path}: not a readable safetensors file ({e})") from None
