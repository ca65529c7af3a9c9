"""Hugging Face transformers backend: any AutoModelForCausalLM in a local folder."""
from __future__ import annotations

from pathlib import Path

import torch

from specfast.kernels import full_vocab_argmax

from .base import PackedTargetOutput, TargetModel, aux_layer_ids_default, check_aux_layer_ids


def packed_attention_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, T, T] mask: causal within each document, nothing across documents."""
    t = torch.arange(doc_ids.numel(), device=doc_ids.device)
    allowed = (t[:, None] >= t[None, :]) & (doc_ids[:, None] == doc_ids[None, :])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def positions_in_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its own document (restarts at 0 at every boundary)."""
    t = torch.arange(doc_ids.numel(), device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[1:] = doc_ids[1:] != doc_ids[:-1]
    start_index = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=0).values
    return t - start_index


class HFTarget(TargetModel):
    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 aux_layer_ids: list[int] | None = None, name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        self.name = name or str(path)
        self.path = path
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # sdpa takes our 4D packed-document mask exactly (checked in tests against per-document runs).
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
        self.model.eval().requires_grad_(False)
        cfg = self.model.config
        self.hf_config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.hidden_size = cfg.hidden_size
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.aux_layer_ids = list(aux_layer_ids) if aux_layer_ids is not None else aux_layer_ids_default(self.num_layers)
        check_aux_layer_ids(self.aux_layer_ids, self.num_layers)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def final_norm_weight(self) -> torch.Tensor | None:
        norm = getattr(self.model.base_model, "norm", None)
        w = getattr(norm, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.shape == (self.hidden_size,) else None

    @torch.no_grad()
    def forward_packed(self, input_ids: torch.Tensor, doc_ids: torch.Tensor) -> PackedTargetOutput:
        input_ids = input_ids.to(self.device)
        doc_ids = doc_ids.to(self.device)
        out = self.model.base_model(
            input_ids=input_ids[None],
            attention_mask=packed_attention_mask(doc_ids, self.model.dtype),
            position_ids=positions_in_documents(doc_ids)[None],
            output_hidden_states=True,
            use_cache=False,
        )
        # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1].
        aux = torch.cat([out.hidden_states[i + 1][0] for i in self.aux_layer_ids], dim=-1)
        final = out.last_hidden_state[0]
        return PackedTargetOutput(aux_hidden=aux, final_hidden=final, argmax=full_vocab_argmax(final, self.lm_head_weight()))
