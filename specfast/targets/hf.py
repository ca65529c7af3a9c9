"""Hugging Face transformers backend: any AutoModelForCausalLM in a local folder.

Packed rows. `HFTarget.forward_packed` runs one row of several documents back to back; every
token attends causally within its own document only, and positions restart at 0 per document.
Three ways to run that attention, chosen per call by `packed_attention_path` (the rule and the
numbers behind it are in its docstring; each choice is logged once per target):

- ``flash_varlen``: flash-attn's varlen kernel, through transformers' own ``flash_attention_2``
  support for padding-free packed rows: no attention mask, ``position_ids`` restarting at 0 per
  document, and the document boundaries handed over as ``cu_seq_lens_q/k`` (int32, on the device)
  with ``max_length_q/k`` (ints), so that transformers need not infer them from the position ids
  in every layer. Only where flash-attn is installed (an optional extra) and the target runs on
  CUDA in fp16/bf16.
- ``per_document``: `per_document_attention`, registered with transformers' AttentionInterface as
  ``ATTENTION_PER_DOCUMENT``: one ``scaled_dot_product_attention(..., is_causal=True)`` call per
  document on its slice of q, k, v (GQA through ``enable_gqa``), written back into one output.
  The boundaries travel through the forward's kwargs (``document_bounds``). As the name is not a
  registered mask type, transformers builds no mask for it: nothing of size T×T exists.
- ``dense``: the additive [1, 1, T, T] mask of `packed_attention_mask` through transformers'
  sdpa: O(T²) memory (268 MB of fp32 mask at T = 8192, more for the attention kernel), and on
  CUDA it keeps SDPA off its flash path.

The model stays loaded with ``sdpa`` (what the cached forward and generate use); the packed forward
switches the model's implementation for its own call only and switches back (so one HFTarget is
not for concurrent use from several threads, as a packed forward would change the attention of a
decoding call running beside it).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path

import torch

from .base import PackedTargetOutput, TargetModel
from .packed import (
    ATTENTION_PER_DOCUMENT,
    PACKED_PATHS,
    PER_DOCUMENT_AVAILABLE,
    MissingDocumentBounds,
    document_bounds,
    flash_attn_available,
    flash_varlen_kwargs,
    packed_attention_mask,
    packed_attention_path,
    positions_in_documents,
)

log = logging.getLogger("specfast")


def cut_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def norm_weight(norm, hidden_size: int) -> torch.Tensor | None:
    """A final norm module's [hidden_size] scale, or None where it has none of that shape."""
    w = getattr(norm, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.shape == (hidden_size,) else None


def generation_eos_ids(model) -> set[int]:
    """The eos_token_id(s) of a HF model's generation config: one id, a list, or none."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])}


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
        packed_attention: str = "auto",
    ):
        """`packed_attention`: "auto" (`packed_attention_path` chooses per row), or one of
        PACKED_PATHS for every row (tests and benchmarks)."""
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
        # sdpa for decoding and generation; packed rows switch for their call (module docstring).
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="sdpa"
        ).to(device)
        self.model.eval().requires_grad_(False)
        # transformers renamed `past_key_values` to `cache` (the old name warns, then goes away).
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.hf_config = self.model.config
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self._set_shape(self.model.config, vocab_size, aux_layer_ids)
        if packed_attention not in ("auto", *PACKED_PATHS):
            raise ValueError(
                f"packed_attention={packed_attention!r}: not one of auto, {', '.join(PACKED_PATHS)}"
            )
        self.packed_attention = packed_attention
        self._per_document_ok = PER_DOCUMENT_AVAILABLE and self._can_use_attention(
            ATTENTION_PER_DOCUMENT
        )
        self._flash_ok = flash_attn_available() and self._can_use_attention("flash_attention_2")
        for path, ok in (("per_document", self._per_document_ok), ("flash_varlen", self._flash_ok)):
            if packed_attention == path and not ok:
                raise ValueError(f"{self.name}: packed_attention={path!r} is not available here")
        self._logged_paths: set[str] = set()

    def _set_attention(self, name: str) -> None:
        if hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation(name)
        else:  # transformers before set_attn_implementation: the config is read at every call
            self.model.config._attn_implementation = name

    def _can_use_attention(self, name: str) -> bool:
        """Whether the model takes attention implementation `name` (set, then put back)."""
        try:
            self._set_attention(name)
            return self.model.config._attn_implementation == name
        except (ValueError, ImportError, KeyError) as e:
            log.debug("%s: attention %s unavailable: %s", self.name, name, e)
            return False
        finally:
            self._set_attention("sdpa")

    @contextlib.contextmanager
    def _attention(self, name: str):
        if name == "sdpa":
            yield
            return
        self._set_attention(name)
        try:
            yield
        finally:
            self._set_attention("sdpa")

    def packed_path(self, num_tokens: int, num_docs: int) -> str:
        """The path forward_packed takes for such a row (module docstring), logged once."""
        if self.packed_attention != "auto":
            path, why = self.packed_attention, "packed_attention setting"
        else:
            path, why = packed_attention_path(
                num_tokens,
                num_docs,
                device=self.device,
                dtype=self.model.dtype,
                flash_available=self._flash_ok,
                per_document_available=self._per_document_ok,
            )
        if path not in self._logged_paths:
            self._logged_paths.add(path)
            log.info(
                "%s: packed target forward uses %s attention (%s; first row: %d tokens in %d "
                "documents)",
                self.name,
                path,
                why,
                num_tokens,
                num_docs,
            )
        return path

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def final_norm_weight(self) -> torch.Tensor | None:
        return norm_weight(getattr(self.model.base_model, "norm", None), self.hidden_size)

    def eos_token_ids(self) -> set[int]:
        """The tokenizer's EOS and the generation config's eos_token_id(s)."""
        return super().eos_token_ids() | generation_eos_ids(self.model)

    def _aux(self, hidden_states) -> torch.Tensor:
        # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1].
        return torch.cat([hidden_states[i + 1] for i in self.aux_layer_ids], dim=-1)

    @torch.no_grad()
    def forward_packed(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor,
        argmax_rows: torch.Tensor | None = None,
    ) -> PackedTargetOutput:
        input_ids = input_ids.to(self.device)
        doc_ids = doc_ids.to(self.device)
        bounds = document_bounds(doc_ids)
        path = self.packed_path(len(input_ids), len(bounds) - 1)
        kwargs: dict = {}
        if path == "dense":
            kwargs["attention_mask"] = packed_attention_mask(doc_ids, self.model.dtype)
        elif path == "per_document":
            kwargs["document_bounds"] = bounds
        else:
            kwargs.update(flash_varlen_kwargs(bounds, self.device))
        attention = {
            "dense": "sdpa",
            "per_document": ATTENTION_PER_DOCUMENT,
            "flash_varlen": "flash_attention_2",
        }
        try:
            with self._attention(attention[path]):
                out = self.model.base_model(
                    input_ids=input_ids[None],
                    position_ids=positions_in_documents(doc_ids)[None],
                    output_hidden_states=True,
                    use_cache=False,
                    **kwargs,
                )
        except MissingDocumentBounds as e:
            if self.packed_attention == "per_document":
                raise
            log.warning("%s: %s; packed rows use the dense mask from now on", self.name, e)
            self._per_document_ok = False
            return self.forward_packed(input_ids, doc_ids, argmax_rows)
        final = out.last_hidden_state[0]
        return PackedTargetOutput(
            aux_hidden=self._aux(out.hidden_states)[0],
            final_hidden=final,
            argmax=self._argmax(final, argmax_rows),
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
        # A loop of our own rather than HF `generate`: a row leaves the batch when it ends, so one
        # long answer does not keep the finished rows computing. Measured on 2 cores, SmolLM2, 32
        # ShareGPT first turns: most answers end within ~150 tokens, a few run to the limit.
        from transformers import DynamicCache

        tok, dev = self.tokenizer, self.device
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Left padding, built here: padding through the tokenizer would change its state (and
        # with it the tokenizer hash that prepared data records).
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
        eos = self.eos_token_ids()
        answers: list[list[int]] = [[] for _ in prompts]
        rows = list(range(len(prompts)))  # the prompts still in the batch, in batch order
        cache = DynamicCache()
        position = (mask.cumsum(1) - 1).clamp(min=0)
        for step in range(max_new_tokens):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_arg: cache},
            )
            logits = out.logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1)[:, 0]
            else:
                nxt = logits.argmax(-1)
            keep = []
            for j, (row, t) in enumerate(zip(rows, nxt.tolist())):
                answers[row].append(t)
                if t not in eos:
                    keep.append(j)
            if not keep or step + 1 == max_new_tokens:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                rows, nxt, mask = [rows[j] for j in keep], nxt[index], mask[index]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            ids, position = nxt[:, None], mask.sum(1, keepdim=True) - 1
        return answers  # each ends at its first EOS: its row left the batch there
