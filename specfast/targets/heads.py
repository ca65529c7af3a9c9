"""A target without its body: config, tokenizer, embeddings and lm_head only, read straight from the
safetensors files. Offline training (from shards) needs no more than this, so a large target's
decoder layers are never loaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import TargetModel


def _read_tensors(folder: Path, names: list[str]) -> dict:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {n: folder / weight_map[n] for n in names if n in weight_map}
    else:
        files = {n: folder / "model.safetensors" for n in names}
    out = {}
    for name, file in files.items():
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (needed for {name})")
        with safe_open(str(file), "pt") as f:
            if name in f.keys():
                out[name] = f.get_tensor(name)
    return out


class HeadsOnlyTarget(TargetModel):
    def __init__(
        self,
        path: str | Path,
        aux_layer_ids: list[int],
        device="cpu",
        dtype=torch.float32,
        name=None,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        self.name, self.path = name or str(path), path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        cfg = AutoConfig.from_pretrained(path)
        self.hf_config = cfg
        self.num_layers, self.hidden_size = cfg.num_hidden_layers, cfg.hidden_size
        self.aux_layer_ids = list(aux_layer_ids)
        # Parameter names differ by architecture: find them on a weightless (meta) copy.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
        params = list(skeleton.named_parameters(remove_duplicate=False))

        def aliases(t):  # tied weights have several names; the file holds one of them
            return [n for n, p in params if t is not None and p is t]

        embed_names = aliases(skeleton.get_input_embeddings().weight)
        head_names = aliases(skeleton.get_output_embeddings().weight)
        norm_names = aliases(getattr(getattr(skeleton.base_model, "norm", None), "weight", None))
        got = _read_tensors(path, embed_names + head_names + norm_names)

        def first(names):
            return next((got[n] for n in names if n in got), None)

        embed, head, norm = first(embed_names), first(head_names), first(norm_names)
        if embed is None or head is None:
            raise FileNotFoundError(
                f"{path}: embeddings or lm_head ({embed_names + head_names}) "
                "not in its safetensors files"
            )
        self._embed = embed.to(device=device, dtype=dtype)
        self._lm_head = head.to(device=device, dtype=dtype)
        self._norm = None if norm is None else norm.to(device=device, dtype=dtype)
        self.vocab_size = self._lm_head.shape[0]

    def forward_packed(self, input_ids, doc_ids, argmax_rows=None):
        raise RuntimeError(
            "a heads-only target has no decoder layers; capture hidden states with the full target"
        )

    def lm_head_weight(self):
        return self._lm_head

    def embed_weight(self):
        return self._embed

    def final_norm_weight(self):
        return self._norm
