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
import torch.nn.functional as F

from specfast.conventions import aux_layer_ids_default, check_aux_layer_ids
from specfast.kernels import full_vocab_argmax

from .base import PackedTargetOutput, TargetModel

log = logging.getLogger("specfast")

ATTENTION_PER_DOCUMENT = "specfast_per_document"
PACKED_PATHS = ("flash_varlen", "per_document", "dense")

# The automatic rule (see packed_attention_path): one SDPA call's fixed cost, in the (query, key)
# pairs per layer that the dense mask's attention handles in the same time (CPU, measured).
SDPA_CALL_COST_PAIRS = 512


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


def document_bounds(doc_ids: torch.Tensor) -> list[int]:
    """[0, end of document 0, end of document 1, ..., T]: where each contiguous run of equal doc
    id starts, then T (the cumulative sequence lengths of flash-attn's varlen interface)."""
    starts = (doc_ids[1:] != doc_ids[:-1]).nonzero().flatten() + 1
    return [0, *starts.tolist(), doc_ids.numel()]


def flash_varlen_kwargs(bounds: list[int], device: torch.device) -> dict:
    """The forward kwargs of transformers' padding-free flash_attention_2 path (its
    FlashAttentionKwargs): what it would otherwise infer from the position ids in every layer."""
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)


class MissingDocumentBounds(RuntimeError):
    """The model's forward did not hand `document_bounds` down to its attention layers."""


def per_document_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_bounds: list[int] | tuple[int, ...] | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (AttentionInterface): causal attention within each
    document of a packed row, one SDPA call per document. query [1, Hq, T, D], key and value
    [1, Hkv, T, D] (Hq a multiple of Hkv); returns ([1, T, Hq, D], None) as transformers expects.
    `document_bounds` (from `document_bounds`) comes through the model's forward kwargs; a model
    whose code drops them raises MissingDocumentBounds (forward_packed then falls back to the
    dense mask). A sliding window, where the model has one, applies within each document (a
    banded mask for documents longer than it)."""
    if document_bounds is None:
        raise MissingDocumentBounds(
            f"{type(module).__name__} did not receive document_bounds from the model's forward"
        )
    if softcap is not None:
        raise ValueError("per-document attention (like sdpa) does not support attention softcap")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError("per-document attention is causal; this layer is not")
    batch, heads, length, _ = query.shape
    if batch != 1 or document_bounds[-1] != length:
        raise ValueError(
            f"per-document attention takes one packed row of {document_bounds[-1]} tokens, "
            f"got query {tuple(query.shape)}"
        )
    gqa = heads != key.shape[1]
    out = query.new_empty(1, length, heads, value.shape[-1])
    for start, end in zip(document_bounds[:-1], document_bounds[1:]):
        q, k, v = (x[:, :, start:end] for x in (query, key, value))
        n = end - start
        if sliding_window is not None and n > sliding_window:  # keys q - k < window back
            i = torch.arange(n, device=query.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
            if gqa:
                k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=scaling)
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa
            )
        out[:, start:end] = o.transpose(1, 2)
    return out, None


def _register_per_document_attention() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.48
        return False
    AttentionInterface.register(ATTENTION_PER_DOCUMENT, per_document_attention)
    return True


PER_DOCUMENT_AVAILABLE = _register_per_document_attention()


def flash_attn_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    return bool(is_flash_attn_2_available())


def packed_attention_path(
    num_tokens: int,
    num_docs: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    flash_available: bool,
    per_document_available: bool = True,
) -> tuple[str, str]:
    """(path, reason): how `HFTarget.forward_packed` runs a packed row of `num_tokens` tokens in
    `num_docs` documents. The rule:

    1. ``flash_varlen`` where flash-attn is installed, on CUDA, in fp16/bf16;
    2. else ``dense`` where (documents - 1) * SDPA_CALL_COST_PAIRS > T²: the per-document
       loop pays a fixed cost per SDPA call (documents calls a layer against the dense path's
       one), the dense mask a cost per (query, key) pair (T² a layer). Only short rows of tiny
       documents qualify (T < 512 and a mean document length of about 512 / T tokens or less:
       4 at T = 128); a single document never does, nor do ShareGPT rows;
    3. else ``per_document``.

    Measured on CPU (bench/results/target_forward-cpu-2core.md: SmolLM2-135M, fp32, one thread,
    a shared 2-core machine). Whole forward, dense vs per document: T = 8192 in 24 ShareGPT-like
    documents 186 s vs 56 s (3.3×), peak 1482 vs 1016 MiB; one 8192-token document 188 s vs
    114 s (1.65×); T = 2048 in 5 documents 19.4 s vs 13.1 s (1.5×), one document 1.3×; at
    T <= 512 the attention is a small part and the two are within 10% either way (dense 0.76 s
    vs 0.88 s at T = 128 in 1-token documents). One layer's attention alone, where the rule's
    constant comes from: dense wins at T = 128 in 1-token documents (0.71 vs 2.19 ms) and
    2-token documents (0.67 vs 1.21 ms); they tie at T = 128 in 4-token documents (32 · 512 =
    128²) and at T = 512 in 1-token documents (512 · 512 = 512²); per document wins by 1.2–12×
    everywhere else measured (T = 2048 ShareGPT-like: 295 vs 59 ms). On CUDA the rule is the
    same but unmeasured (no GPU here); with flash-attn installed it does not apply."""
    if flash_available and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return "flash_varlen", "flash-attn installed, CUDA, half precision"
    if not per_document_available:
        return "dense", "this transformers has no AttentionInterface"
    if (num_docs - 1) * SDPA_CALL_COST_PAIRS > num_tokens**2:
        return "dense", f"(documents - 1) * {SDPA_CALL_COST_PAIRS} > T²: many tiny documents"
    return "per_document", "no T×T mask: one causal SDPA call per document"


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

    def _argmax(self, final: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Full-vocabulary argmax of the `rows` (all when None); -1 elsewhere."""
        if rows is None:
            return full_vocab_argmax(final, self.lm_head_weight())
        rows = rows.to(self.device)
        if rows.dtype != torch.bool or rows.shape != final.shape[:1]:
            raise ValueError(
                f"argmax_rows must be bool [{final.shape[0]}], got {rows.dtype} {tuple(rows.shape)}"
            )
        argmax = torch.full(rows.shape, -1, dtype=torch.int64, device=self.device)
        argmax[rows] = full_vocab_argmax(final[rows], self.lm_head_weight())
        return argmax

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
