"""Hugging Face transformers backend: any AutoModelForCausalLM in a local folder."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from specfast.conventions import aux_layer_ids_default, check_aux_layer_ids
from specfast.kernels import full_vocab_argmax

from .base import PackedTargetOutput, TargetModel


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


def cut_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


class HFCache:
    """A transformers DynamicCache for one sequence."""

    def __init__(self):
        from transformers import DynamicCache

        self.kv = DynamicCache()

    def __len__(self) -> int:
        return self.kv.get_seq_length()

    def crop(self, length: int) -> None:
        # A negative argument removes that many tokens, which is what DynamicCache.crop means by it
        # in every transformers version (v5 refuses a positive one).
        remove = len(self) - length
        if remove > 0:
            self.kv.crop(-remove)


class HFTarget(TargetModel):
    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        aux_layer_ids: list[int] | None = None,
        name: str | None = None,
    ):
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
        # sdpa takes our 4D packed-document mask exactly (tests check it against separate runs).
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
        self.model.eval().requires_grad_(False)
        # transformers renamed `past_key_values` to `cache` (the old name warns, then goes away).
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        cfg = self.model.config
        self.hf_config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.hidden_size = cfg.hidden_size
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.aux_layer_ids = (
            list(aux_layer_ids)
            if aux_layer_ids is not None
            else aux_layer_ids_default(self.num_layers)
        )
        check_aux_layer_ids(self.aux_layer_ids, self.num_layers, self.name)

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def final_norm_weight(self) -> torch.Tensor | None:
        norm = getattr(self.model.base_model, "norm", None)
        w = getattr(norm, "weight", None)
        return w if isinstance(w, torch.Tensor) and w.shape == (self.hidden_size,) else None

    def eos_token_ids(self) -> set[int]:
        """The tokenizer's EOS and the generation config's eos_token_id(s)."""
        ids = super().eos_token_ids()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            ids.update(
                int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
            )
        return ids

    def _aux(self, hidden_states) -> torch.Tensor:
        # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1].
        return torch.cat([hidden_states[i + 1] for i in self.aux_layer_ids], dim=-1)

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
        final = out.last_hidden_state[0]
        return PackedTargetOutput(
            aux_hidden=self._aux(out.hidden_states)[0],
            final_hidden=final,
            argmax=full_vocab_argmax(final, self.lm_head_weight()),
        )

    def new_cache(self) -> HFCache:
        return HFCache()

    @torch.no_grad()
    def forward_cached(
        self, tokens: list[int], cache: HFCache, with_aux: bool = False, logits_to_keep: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = torch.tensor([tokens], device=self.device)
        out = self.model(
            input_ids=ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            output_hidden_states=with_aux,
            **{self._cache_arg: cache.kv},
        )
        return out.logits[0].float(), (self._aux(out.hidden_states) if with_aux else None)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0
    ) -> list[list[int]]:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Left padding, built here: padding through the tokenizer would change its state (and
        # with it the tokenizer hash that prepared data records).
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            if temperature > 0
            else dict(do_sample=False)
        )
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **sampling,
        )
        eos = self.eos_token_ids()
        return [cut_after_eos(row[width:].tolist(), eos) for row in out]
