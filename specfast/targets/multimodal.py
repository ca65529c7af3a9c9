"""Multimodal targets: vision-language (Qwen2.5-VL) and speech (Qwen3-ASR) models behind the
TargetModel interface. The draft stays the text EAGLE-3 draft; the target reads the media.

What differs from a text target (specfast/targets/hf.py):

- Media. A prompt's media become placeholder tokens: the chat template writes one placeholder per
  image (`<|image_pad|>`) or clip (`<|audio_pad|>`), and `MediaProcessor.expand` repeats it as many
  times as the media encoder yields embeddings (Qwen2.5-VL: grid_t·grid_h·grid_w / merge²;
  Qwen3-ASR: the audio encoder's output length). Prepared data and shards hold the expanded ids,
  so a sample's token count is what the target reads. Placeholder tokens are never supervised.
- Positions. Qwen2.5-VL uses 3-D mRoPE: `MediaProcessor.rope_positions` is the model's own
  `get_rope_index` for one document (rows temporal, height, width). Text tokens have three equal
  rows; after an image of grid (h, w) the text continues at the image's start + max(h, w) / merge,
  so positions run behind the token index. Qwen3-ASR's positions are the token index on every row
  (vLLM runs it with mRoPE rows that are all equal; transformers with 1-D RoPE: the same angles).
  The draft is a plain-RoPE Llama layer and uses row 0 (the temporal row) of the target's
  positions: the rule vLLM's proposer follows (specfast.ttt docstring, `draft_positions`);
  `PackedTargetOutput.positions` carries it.
- Packed rows. `forward_packed` runs each document of a row on its own (batch 1, no mask, the
  model's own media path), so a document's media and mRoPE positions never mix with another's.
  Media come with the row: `forward_packed(..., media=BatchMedia)` or attached to the token
  tensor by `PreparedData.read` (specfast.data.media).
- Decoding. `new_cache(media)` starts a sequence whose first `forward_cached` (the prompt) reads
  the media; later calls continue the positions at token index + the prompt's mRoPE delta, as
  vLLM does. `MultimodalCache.draft_positions` gives the draft's positions for eval.
- The draft's config (`hf_config`) is the text model's config without `mrope_section`: the draft
  exports plain RoPE, which is how vLLM runs an EAGLE-3 draft of these targets (the proposer
  checks the *draft's* config for mRoPE, and a text-only draft gets positions[0]).

Not supported here: video inputs, `prepare --regenerate` on media (the target would have to
generate with media in its context), and several media models beyond the two families below.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import PackedTargetOutput, TargetModel, tokenizer_hash
from .hf import cut_after_eos, generation_eos_ids, norm_weight

log = logging.getLogger("specfast")

# model_type -> (media kind, config field of the placeholder token id)
FAMILIES = {
    "qwen2_5_vl": ("image", "image_token_id"),
    "qwen3_asr": ("audio", "audio_token_id"),
}


def model_type(path: str | Path) -> str | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_multimodal_folder(path: str | Path) -> bool:
    return model_type(path) in FAMILIES


def _chat_template(path: Path, tokenizer) -> str | None:
    """The processor's chat template (chat_template.json / .jinja beside the model) if the folder
    has one, else the tokenizer's."""
    js = path / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text())["chat_template"]
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return getattr(tokenizer, "chat_template", None)


@dataclass
class Features:
    """A document's media, encoded for the model: forward kwargs and the placeholder count of
    each item."""

    kwargs: dict
    counts: list[int]
    grid: torch.Tensor | None = None  # Qwen2.5-VL image_grid_thw [n, 3]


class MediaProcessor:
    """Tokenizer + image processor / audio feature extractor of a multimodal target folder: chat
    rendering, placeholder expansion, media features and RoPE positions, without the weights."""

    def __init__(self, path: str | Path):
        from transformers import AutoConfig, AutoTokenizer

        self.path = Path(path)
        mtype = model_type(self.path)
        if mtype not in FAMILIES:
            raise ValueError(
                f"{self.path}: model_type {mtype!r} is not a supported multimodal target "
                f"({', '.join(FAMILIES)})"
            )
        self.model_type = mtype
        self.kind, id_field = FAMILIES[mtype]
        self.config = AutoConfig.from_pretrained(self.path)
        self.placeholder_id = int(getattr(self.config, id_field))
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.chat_template = _chat_template(self.path, self.tokenizer)
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = self.chat_template
        if self.kind == "image":
            from transformers import AutoImageProcessor

            self.media_processor = AutoImageProcessor.from_pretrained(self.path)
            self.merge = int(self.config.vision_config.spatial_merge_size)
        else:
            from transformers import AutoFeatureExtractor

            self.media_processor = AutoFeatureExtractor.from_pretrained(self.path)
            self.n_window = int(getattr(self.config.audio_config, "n_window", 50))
        self._rope_model = None  # set by MultimodalTarget (get_rope_index lives on the model)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages, tokenize=False, chat_template=None, **kw):
        """The tokenizer-like rendering specfast.data.chat calls, with the processor's template."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=chat_template or self.chat_template, **kw
        )

    def tokenize_conversation(self, messages: list[dict], media: list):
        """(input_ids int32 [n], loss_mask bool [n]) with the placeholders expanded: the
        assistant mask from specfast.data.chat (growing-prefix rule), placeholders never
        supervised."""
        from specfast.data.chat import TemplateError, Tokenized, assistant_spans

        text, spans = assistant_spans(self, messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        starts = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 0]
        mask = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            mask |= (starts >= a) & (starts < b)
        counts = self.features(media).counts if media else []
        if int((ids == self.placeholder_id).sum()) != len(counts):
            raise TemplateError(
                f"the chat template wrote {int((ids == self.placeholder_id).sum())} media "
                f"placeholders for {len(counts)} media items"
            )
        rep = np.ones(len(ids), dtype=np.int64)
        rep[ids == self.placeholder_id] = counts
        ids, mask = np.repeat(ids, rep), np.repeat(mask, rep)
        mask[ids == self.placeholder_id] = False
        return Tokenized(ids.astype(np.int32), mask)

    def encode_prompt(self, messages: list[dict], media: list, where: str = "") -> list[int]:
        """Prompt ids (generation prompt added) with the placeholders expanded."""
        try:
            text = self.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # a template error is a data/tokenizer problem: say where
            raise ValueError(f"{where}: chat template failed ({e})") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.expand(ids, self.features(media).counts if media else [], where)

    def expand(self, ids: list[int], counts: list[int], where: str = "") -> list[int]:
        """Each single placeholder token repeated as often as its media item's embeddings."""
        n = sum(1 for t in ids if t == self.placeholder_id)
        if n != len(counts):
            raise ValueError(f"{where}: {n} media placeholders for {len(counts)} media items")
        out, it = [], iter(counts)
        for t in ids:
            out.extend([t] * next(it) if t == self.placeholder_id else [t])
        return out

    # -- media --------------------------------------------------------------------------------

    def features(self, media: list) -> Features:
        """Encode media (specfast.data.media.Media, or decoded PIL images / float arrays)."""
        decoded = [m.decode() if hasattr(m, "decode") else m for m in media]
        if self.kind == "image":
            out = self.media_processor(images=decoded, return_tensors="pt")
            grid = out["image_grid_thw"]
            counts = (grid.prod(-1) // (self.merge**2)).tolist()
            kw = {"pixel_values": out["pixel_values"], "image_grid_thw": grid}
            return Features(kw, [int(c) for c in counts], grid)
        from transformers.models.qwen3_asr.modeling_qwen3_asr import (
            _get_feat_extract_output_lengths,
        )

        out = self.media_processor(
            decoded,
            sampling_rate=self.media_processor.sampling_rate,
            return_tensors="pt",
            return_attention_mask=True,
            padding=True,
        )
        mask = out.get("input_features_mask", out.get("attention_mask"))
        counts = _get_feat_extract_output_lengths(mask.sum(-1), self.n_window).tolist()
        kw = {"input_features": out["input_features"], "input_features_mask": mask}
        return Features(kw, [int(c) for c in counts])

    def rope_positions(self, ids: torch.Tensor, feats: Features | None) -> torch.Tensor:
        """[3, T] RoPE positions of one document as the target computes them (see the module
        docstring)."""
        T = ids.numel()
        if self.kind != "image" or feats is None or feats.grid is None:
            return torch.arange(T, device=ids.device).expand(3, T).clone()
        mm = (ids == self.placeholder_id).int()
        pos, _ = self._rope_model.get_rope_index(
            ids[None], mm_token_type_ids=mm[None], image_grid_thw=feats.grid.to(ids.device)
        )
        return pos[:, 0]


def _draft_config(text_config):
    """The text config the draft copies, without mRoPE sections (the draft uses plain RoPE on the
    temporal row; see the module docstring)."""
    cfg = copy.deepcopy(text_config)
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(cfg, name, None)
        if isinstance(rope, dict) and ("mrope_section" in rope or "mrope_interleaved" in rope):
            rope = {
                k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved")
            }
            if rope.get("rope_type", rope.get("type")) in ("mrope", "default"):
                rope["rope_type"] = "default"
                rope.pop("type", None)
            try:
                setattr(cfg, name, rope)
            except (AttributeError, TypeError):  # a read-only alias of the other field
                pass
    return cfg


class MultimodalCache:
    """A KV cache for one sequence, with the prompt's media and positions."""

    def __init__(self, media: list | None = None):
        from transformers import DynamicCache

        self.kv = DynamicCache()
        self.media = list(media or [])
        self.prompt_row0: torch.Tensor | None = None  # draft positions of the prompt tokens
        self.delta = 0  # mRoPE position - token index, after the prompt

    def __len__(self) -> int:
        return self.kv.get_seq_length()

    def crop(self, length: int) -> None:
        remove = len(self) - length
        if remove > 0:
            self.kv.crop(-remove)

    def draft_positions(self, start: int, end: int) -> torch.Tensor:
        """The draft's RoPE positions (row 0 of the target's) of token indices start..end-1."""
        idx = torch.arange(start, end)
        out = idx + self.delta
        if self.prompt_row0 is not None:
            inside = idx < self.prompt_row0.numel()
            out[inside] = self.prompt_row0[idx[inside]]
        return out


class MultimodalTarget(TargetModel):
    """A Qwen2.5-VL or Qwen3-ASR folder as a target (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        aux_layer_ids: list[int] | None = None,
        name: str | None = None,
    ):
        path = Path(path)
        self.name, self.path = name or str(path), path
        self.processor = MediaProcessor(path)
        self.tokenizer = self.processor.tokenizer
        self.media_kind = self.processor.kind
        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.processor.model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as cls
        else:
            from transformers import Qwen3ASRForConditionalGeneration as cls
        self.model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
        self.model.eval().requires_grad_(False)
        self.processor._rope_model = self.model.model
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        text = self.model.config.get_text_config()
        self.hf_config = _draft_config(text)
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self._set_shape(text, vocab_size, aux_layer_ids)

    # -- heads --------------------------------------------------------------------------------

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def final_norm_weight(self) -> torch.Tensor | None:
        return norm_weight(getattr(self.model.model.language_model, "norm", None), self.hidden_size)

    def eos_token_ids(self) -> set[int]:
        ids = super().eos_token_ids() | generation_eos_ids(self.model)
        return {i for i in ids if 0 <= i < self.vocab_size}

    # -- forward ------------------------------------------------------------------------------

    def _aux(self, hidden_states) -> torch.Tensor:
        return torch.cat([hidden_states[i + 1] for i in self.aux_layer_ids], dim=-1)

    def _position_ids(self, pos3: torch.Tensor) -> torch.Tensor:
        # Qwen2.5-VL takes the three mRoPE rows, Qwen3-ASR's text model one row.
        return pos3[:, None] if self.media_kind == "image" else pos3[:1]

    def _features(self, media: list, ids: torch.Tensor, where: str) -> Features | None:
        n_tokens = int((ids == self.processor.placeholder_id).sum())
        if not media:
            if n_tokens:
                raise ValueError(
                    f"{where}: {n_tokens} {self.media_kind} placeholder tokens but no media were "
                    "given (multimodal data must come with its media: a prepared folder's "
                    "media.json, or media= for a prompt)"
                )
            return None
        feats = self.processor.features(media)
        if sum(feats.counts) != n_tokens:
            raise ValueError(
                f"{where}: {n_tokens} placeholder tokens for media of {sum(feats.counts)} "
                "embeddings (a sample cut short, or media that do not belong to it)"
            )
        dev = self.device
        feats.kwargs = {
            k: (v.to(dev, self.model.dtype) if v.is_floating_point() else v.to(dev))
            for k, v in feats.kwargs.items()
        }
        return feats

    @torch.no_grad()
    def forward_packed(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor,
        argmax_rows: torch.Tensor | None = None,
        media=None,
    ) -> PackedTargetOutput:
        """As TargetModel.forward_packed; `media`: a BatchMedia (one list per document), else the
        one attached to `input_ids` (specfast.data.media.attach), else none."""
        from specfast.data.media import attached

        media = media if media is not None else attached(input_ids)
        ids_all = input_ids.to(self.device)
        doc_ids = doc_ids.to(self.device)
        starts = [0, *((doc_ids[1:] != doc_ids[:-1]).nonzero().flatten() + 1).tolist()]
        bounds = list(zip(starts, [*starts[1:], ids_all.numel()]))
        if media is not None and len(media.docs) != len(bounds):
            raise ValueError(f"media for {len(media.docs)} documents, row has {len(bounds)}")
        aux, final, positions = [], [], []
        for d, (a, b) in enumerate(bounds):
            ids = ids_all[a:b]
            where = media.where[d] if media is not None and media.where else f"document {d}"
            feats = self._features(media.docs[d] if media is not None else [], ids, where)
            pos3 = self.processor.rope_positions(ids, feats)
            out = self.model.model(
                input_ids=ids[None],
                position_ids=self._position_ids(pos3),
                output_hidden_states=True,
                use_cache=False,
                **(feats.kwargs if feats else {}),
            )
            aux.append(self._aux(out.hidden_states)[0])
            final.append(out.last_hidden_state[0])
            positions.append(pos3[0])
        final_t = torch.cat(final)
        return PackedTargetOutput(
            aux_hidden=torch.cat(aux),
            final_hidden=final_t,
            argmax=self._argmax(final_t, argmax_rows),
            positions=torch.cat(positions),
        )

    # -- decoding -----------------------------------------------------------------------------

    def new_cache(self, media: list | None = None) -> MultimodalCache:
        return MultimodalCache(media)

    def encode_prompt(self, messages: list[dict], media: list, where: str = "") -> list[int]:
        return self.processor.encode_prompt(messages, media, where)

    @torch.no_grad()
    def forward_cached(
        self,
        tokens: list[int],
        cache: MultimodalCache,
        with_aux: bool = False,
        logits_to_keep: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = torch.tensor(tokens, device=self.device)
        start = len(cache)
        kwargs = {}
        if start == 0:  # the prompt: media and mRoPE positions
            feats = self._features(cache.media, ids, "prompt")
            pos3 = self.processor.rope_positions(ids, feats)
            cache.prompt_row0 = pos3[0].cpu()
            cache.delta = int(pos3.max()) + 1 - ids.numel()
            kwargs = feats.kwargs if feats else {}
        else:
            idx = torch.arange(start, start + ids.numel(), device=self.device) + cache.delta
            pos3 = idx.expand(3, -1)
        out = self.model(
            input_ids=ids[None],
            position_ids=self._position_ids(pos3),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            output_hidden_states=with_aux,
            **{self._cache_arg: cache.kv},
            **kwargs,
        )
        return out.logits[0].float(), (self._aux(out.hidden_states) if with_aux else None)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        media: list[list] | None = None,
    ) -> list[list[int]]:
        """One prompt at a time through the cached forward (greedy or sampled)."""
        eos = self.eos_token_ids()
        outs = []
        for i, p in enumerate(prompts):
            cache = self.new_cache(media[i] if media else None)
            logits, _ = self.forward_cached(list(p), cache)
            out: list[int] = []
            while len(out) < max_new_tokens:
                if temperature > 0:
                    probs = torch.softmax(logits[-1] / temperature, dim=-1)
                    out.append(int(torch.multinomial(probs.cpu(), 1)))
                else:
                    out.append(int(logits[-1].argmax()))
                if out[-1] in eos:
                    break
                logits, _ = self.forward_cached(out[-1:], cache)
            outs.append(cut_after_eos(out, eos))
        return outs


TEXT_VIEW = "text_target"


def write_text_view(target: MultimodalTarget, out: str | Path) -> Path:
    """A causal-LM folder holding only what offline training reads of the target: the text
    config (as the draft copies it), the tokenizer, and the embeddings, final norm and lm_head
    (`specfast train --data SHARDS --target SHARDS/text_target`; the trainer's heads-only
    target reads a causal-LM folder). Written once, atomically."""
    from transformers import AutoConfig

    from specfast.fileio import atomic_dir, atomic_save_safetensors

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    text = target.hf_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    # As a Llama config: the same fields the heads-only target and the draft read (widths, heads,
    # norm eps, RoPE) and the same tensor names, and no tokenizer class of its own that
    # AutoTokenizer would put in place of the target's.
    cfg = AutoConfig.for_model("llama", **text)
    tied = bool(getattr(target.model.config, "tie_word_embeddings", False))
    cfg.tie_word_embeddings = tied
    tensors = {"model.embed_tokens.weight": target.embed_weight().detach().float().cpu()}
    if not tied:
        tensors["lm_head.weight"] = target.lm_head_weight().detach().float().cpu()
    norm = target.final_norm_weight()
    if norm is not None:
        tensors["model.norm.weight"] = norm.detach().float().cpu()
    with atomic_dir(out) as tmp:
        cfg.save_pretrained(tmp)
        target.tokenizer.save_pretrained(tmp)
        atomic_save_safetensors(tensors, Path(tmp) / "model.safetensors")
        from transformers import AutoTokenizer

        got = tokenizer_hash(AutoTokenizer.from_pretrained(tmp))
        if got != target.tokenizer_hash():
            raise RuntimeError(
                f"{out}: the text view's tokenizer loads differently ({got}, target's "
                f"{target.tokenizer_hash()}); offline training would refuse these shards"
            )
    return out
