"""Images and audio in chat data: reading them from records, storing them by content hash, and
handing a batch's media to a multimodal target (specfast.targets.multimodal).

Records. OpenAI-style `messages` whose content is a string or a list of parts:

    {"type": "text", "text": "..."}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." | "path/to/img.png"}}
    {"type": "image", "image": "path/to/img.png" | "data:..."}
    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}
    {"type": "audio", "audio": "path/to/clip.wav" | "data:..."}    (or "audio_url", as image_url)

A relative path is taken from the folder of the file the record came from. Remote (http) URLs
are refused: nothing is downloaded. A part that names a missing or unreadable file, or bytes
that do not decode as an image / a WAV clip, makes the record bad: prepare skips it and reports
it by file:line and part, like any malformed record.

Storage. A prepared folder with media holds `media/<sha256>.<ext>` (the original bytes, stored
once however many samples use them) and `media.json`: for each sample index, its media in order
of appearance as {"kind", "sha256", "ext"}, plus the record it came from. Multimodal samples are
never cut: `PreparedData.read` refuses to cut one to a token budget (the image's placeholder
tokens would lose their pixels), so --max-len at prepare time drops them whole, and training
needs --batch-tokens at least the longest one (meta.json `media.max_sample_tokens`).

Batches. `PreparedData.read` attaches the batch's media (a `BatchMedia`, one list per sample) to
the token tensor it returns (`attach` / `attached`); a multimodal target's `forward_packed` reads
it from there, so the training pipeline hands media through unchanged. A target can also be given
a BatchMedia explicitly (`forward_packed(..., media=...)`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from specfast.fileio import atomic_write, atomic_write_json

MEDIA_DIR = "media"
MEDIA_INDEX = "media.json"
SAMPLE_RATE = 16000  # what the speech targets' feature extractors expect
IMAGE_EXTS = {"png", "jpg", "jpeg", "gif", "webp", "bmp"}
AUDIO_EXTS = {"wav", "wave"}


class MediaError(ValueError):
    """A media part that cannot be used; the message names the part and why."""


@dataclass(frozen=True)
class MediaRef:
    kind: str  # "image" or "audio"
    sha256: str
    ext: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "sha256": self.sha256, "ext": self.ext}


@dataclass
class Media:
    """One image or audio clip, as bytes (content-hashed) and decoded."""

    kind: str
    data: bytes
    ext: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def ref(self) -> MediaRef:
        return MediaRef(self.kind, self.sha256, self.ext)

    def decode(self):
        """A PIL RGB image, or mono float32 samples at SAMPLE_RATE."""
        return decode_image(self.data) if self.kind == "image" else decode_audio(self.data)


# -- reading parts --------------------------------------------------------------------------------


def _from_data_url(url: str, what: str) -> tuple[bytes, str]:
    head, _, payload = url.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise MediaError(f"{what}: only base64 data: URLs are read")
    mime = head[5:].split(";")[0]
    ext = mime.split("/")[-1].lower() if "/" in mime else ""
    try:
        return base64.b64decode(payload, validate=True), {"x-wav": "wav", "jpeg": "jpg"}.get(
            ext, ext
        )
    except ValueError:
        raise MediaError(f"{what}: data URL is not valid base64") from None


def _from_location(loc: str, base_dir: Path, what: str) -> tuple[bytes, str]:
    if loc.startswith("data:"):
        return _from_data_url(loc, what)
    if loc.startswith(("http://", "https://")):
        raise MediaError(f"{what}: remote URL {loc!r} is not fetched; give a local path")
    path = Path(loc[7:] if loc.startswith("file://") else loc).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise MediaError(f"{what}: {path}: no such file")
    try:
        return path.read_bytes(), path.suffix.lstrip(".").lower()
    except OSError as e:
        raise MediaError(f"{what}: {path}: unreadable ({e.strerror})") from None


def read_part(part: dict, base_dir: Path, what: str) -> tuple[dict, Media | None]:
    """One content part -> (the part as a processor's chat template takes it, its media or None)."""
    if not isinstance(part, dict) or "type" not in part:
        raise MediaError(f"{what}: a content part must be an object with a 'type'")
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise MediaError(f"{what}: text part without a string 'text'")
        return {"type": "text", "text": text}, None
    if kind in ("image_url", "audio_url"):
        spec = part.get(kind)
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str):
            raise MediaError(f"{what}: {kind} part without a url")
        data, ext = _from_location(url, base_dir, what)
        media = Media("image" if kind == "image_url" else "audio", data, ext)
    elif kind in ("image", "audio"):
        loc = part.get(kind) or part.get("path") or part.get("url")
        if not isinstance(loc, str):
            raise MediaError(f"{what}: {kind} part without a path or data URL")
        data, ext = _from_location(loc, base_dir, what)
        media = Media(kind, data, ext)
    elif kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise MediaError(f"{what}: input_audio part without base64 'data'")
        try:
            data = base64.b64decode(spec["data"], validate=True)
        except ValueError:
            raise MediaError(f"{what}: input_audio data is not valid base64") from None
        media = Media("audio", data, str(spec.get("format", "wav")).lower())
    else:
        raise MediaError(f"{what}: unknown content part type {kind!r}")
    try:  # unreadable media are found here, at prepare time, not in the middle of training
        media.decode()
    except MediaError as e:
        raise MediaError(f"{what}: {e}") from None
    return {"type": media.kind}, media


def decode_image(data: bytes):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"not a readable image ({e})") from None
    return img.convert("RGB")


def decode_audio(data: bytes, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples at `rate` from WAV bytes (PCM 8/16/32-bit); other formats through
    soundfile where it is installed. A different sample rate is resampled linearly."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            width, channels, sr = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
        if dtype is None:
            raise MediaError(f"WAV with {8 * width}-bit samples is not supported")
        x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
        x = (x - 128) / 128 if width == 1 else x / float(np.iinfo(dtype).max)
        x = x.reshape(-1, channels).mean(axis=1)
    except (wave.Error, EOFError):
        try:
            import soundfile
        except ImportError:
            raise MediaError("not a readable WAV clip (other formats need soundfile)") from None
        try:
            x, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except Exception as e:  # soundfile raises its own error types
            raise MediaError(f"not a readable audio clip ({e})") from None
        x = x.mean(axis=1)
    if x.size == 0:
        raise MediaError("empty audio clip")
    if sr != rate:
        n = max(1, round(x.size * rate / sr))
        x = np.interp(np.linspace(0, x.size - 1, n), np.arange(x.size), x).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def parse_record(record, where: str, base_dir: Path) -> tuple[list[dict], list[Media]]:
    """One OpenAI-style record whose contents may hold media parts -> (messages for the
    processor's chat template: consecutive same-role turns merged, leading assistant turns
    dropped; the media in order of appearance). Raises RecordError naming the record."""
    from .readers import ROLE_ALIASES, RecordError

    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise RecordError(where, "a multimodal record needs a 'messages' list")
    messages: list[dict] = []
    media: list[Media] = []
    for j, turn in enumerate(record["messages"]):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RecordError(where, f"turn {j} lacks 'role'/'content'")
        role = ROLE_ALIASES.get(str(turn["role"]).lower())
        if role is None:
            raise RecordError(where, f"turn {j} has unknown role {turn['role']!r}")
        content = turn["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}] if content.strip() else []
        elif isinstance(content, list):
            parts = []
            for p, part in enumerate(content):
                try:
                    clean, m = read_part(part, base_dir, f"turn {j} part {p}")
                except MediaError as e:
                    raise RecordError(where, str(e)) from None
                if m is not None:
                    if role != "user":
                        raise RecordError(where, f"turn {j} part {p}: media only in user turns")
                    media.append(m)
                parts.append(clean)
        else:
            raise RecordError(where, f"turn {j} content is {type(content).__name__}")
        if not parts:
            continue
        if role == "system" and messages:
            raise RecordError(where, f"turn {j}: system message after the conversation started")
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += [{"type": "text", "text": "\n\n"}, *parts]
        else:
            messages.append({"role": role, "content": parts})
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(where, "no assistant turn after a user turn")
    return messages, media


def has_media_parts(record) -> bool:
    """Whether a raw record's messages hold content-part lists (the multimodal reader's input)."""
    msgs = record.get("messages") if isinstance(record, dict) else None
    return isinstance(msgs, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in msgs
    )


def flatten_text(messages: list[dict]) -> list[dict]:
    """Messages with text-only part lists as plain strings (for a text tokenizer's template)."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            if any(p["type"] != "text" for p in c):
                raise MediaError("a text-only target cannot read media parts")
            c = "".join(p["text"] for p in c)
        out.append({"role": m["role"], "content": c})
    return out


# -- storage --------------------------------------------------------------------------------------


class MediaStore:
    """`root/media/<sha256>.<ext>`: each distinct image or clip once."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / MEDIA_DIR

    def put(self, media: Media) -> MediaRef:
        ref = media.ref
        path = self.path(ref)
        if not path.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(path, media.data)
        return ref

    def path(self, ref: MediaRef) -> Path:
        return self.dir / f"{ref.sha256}.{ref.ext or 'bin'}"

    def get(self, ref: MediaRef) -> Media:
        path = self.path(ref)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: media file missing from the prepared folder")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ValueError(f"{path}: content does not match its hash (corrupt media file)")
        return Media(ref.kind, data, ref.ext)


@dataclass
class MediaTable:
    """Which media each prepared sample holds (sample index -> refs), and where it came from."""

    samples: dict[int, list[MediaRef]] = field(default_factory=dict)
    sources: dict[int, str] = field(default_factory=dict)

    def add(self, index: int, refs: list[MediaRef], where: str) -> None:
        if refs:
            self.samples[index] = list(refs)
            self.sources[index] = where

    def save(self, root: Path) -> None:
        atomic_write_json(
            Path(root) / MEDIA_INDEX,
            {
                "samples": {
                    str(i): {"where": self.sources.get(i, ""), "media": [r.to_json() for r in refs]}
                    for i, refs in sorted(self.samples.items())
                }
            },
        )

    @staticmethod
    def load(root: Path) -> "MediaTable | None":
        path = Path(root) / MEDIA_INDEX
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())["samples"]
        table = MediaTable()
        for key, entry in raw.items():
            table.add(int(key), [MediaRef(**m) for m in entry["media"]], entry.get("where", ""))
        return table


@dataclass
class BatchMedia:
    """The media of a packed row's documents: `docs[d]` lists document d's media in order."""

    docs: list[list[Media]]
    where: list[str] = field(default_factory=list)  # per document, for messages

    @staticmethod
    def from_table(table: MediaTable, store: MediaStore, indices) -> "BatchMedia":
        idx = [int(i) for i in indices]
        return BatchMedia(
            [[store.get(r) for r in table.samples.get(i, [])] for i in idx],
            [table.sources.get(i, f"sample {i}") for i in idx],
        )


_ATTR = "_specfast_media"


def attach(tensor, media: BatchMedia):
    """Hand `media` along with a token tensor (see the module docstring); returns the tensor."""
    setattr(tensor, _ATTR, media)
    return tensor


def attached(tensor) -> BatchMedia | None:
    return getattr(tensor, _ATTR, None)


# -- prepare --------------------------------------------------------------------------------------


def iter_media_conversations(path: str | Path, stats) -> Iterator[tuple[str, list, list]]:
    """(where, messages, media) for every usable record of a file (text-only records too); bad
    records, unreadable media included, are counted in `stats` (a readers.ReadStats) and
    skipped."""
    from .readers import RecordError, iter_records, normalise

    base = Path(path).resolve().parent
    for where, record in iter_records(path, stats):
        stats.records += 1
        try:
            if has_media_parts(record):
                messages, media = parse_record(record, where, base)
            else:
                messages, media = normalise(record, where), []
        except RecordError as err:
            stats.note_bad(err)
            continue
        yield where, messages, media


def heldout_record(where: str, messages: list[dict], media: list[Media], store: MediaStore):
    """A held-out conversation for heldout.jsonl, its media parts pointing at the stored files
    (so `specfast eval --prompts DIR/heldout.jsonl` reads them from anywhere)."""
    it = iter(media)
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [
                {"type": p["type"], p["type"]: str(store.path(store.put(next(it))).resolve())}
                if p["type"] in ("image", "audio")
                else p
                for p in c
            ]
        out.append({"role": m["role"], "content": c})
    return {"source": where, "messages": out}


def prepare_multimodal(
    inputs,
    out: Path,
    processor,
    target_name: str,
    *,
    draft_vocab_size: int,
    max_len: int,
    overlong: str,
    heldout: int,
    limit: int | None,
    progress: bool,
):
    """`specfast prepare` for a multimodal target (specfast.targets.multimodal.MediaProcessor):
    records with image / audio parts (and plain text records), the processor's chat template,
    placeholder tokens expanded and never supervised, media stored by content hash. A sample with
    media longer than `max_len` is dropped whole (never cut, whatever --overlong says); text-only
    samples follow --overlong. Returns the PrepareStats."""
    import time

    from tqdm import tqdm

    from specfast.fileio import atomic_write

    from .chat import TemplateError
    from .prepare import PrepareStats, collect_conversations, fit_sample, log, save_prepared

    out = Path(out)
    stats = PrepareStats()
    t0 = time.time()
    convs = collect_conversations(inputs, limit, heldout, stats, iter_media_conversations)
    out.mkdir(parents=True, exist_ok=True)
    store = MediaStore(out)
    held, train = convs[len(convs) - heldout :], convs[: len(convs) - heldout]
    stats.heldout, stats.conversations = len(held), len(train)
    atomic_write(
        out / "heldout.jsonl",
        "".join(json.dumps(heldout_record(w, m, md, store)) + "\n" for w, m, md in held),
    )

    ids_parts, mask_parts, lengths = [], [], []
    table = MediaTable()
    dropped_media, media_items, longest = 0, 0, 0
    for where, messages, media in tqdm(
        train, desc="tokenize", unit="conv", disable=not progress, mininterval=1.0
    ):
        try:
            tok = processor.tokenize_conversation(messages, media)
        except (TemplateError, MediaError, ValueError) as e:
            stats.template_errors += 1
            if stats.template_errors <= 5:
                log.warning("%s: %s", where, e)
            continue
        ids, mask = tok.input_ids, tok.loss_mask
        if len(ids) > max_len and media:
            dropped_media += 1
            if dropped_media <= 5:
                log.warning(
                    "%s: %d tokens with its media, over --max-len %d: dropped whole (a "
                    "sample's media are never cut from its text)",
                    where,
                    len(ids),
                    max_len,
                )
            continue
        kept = fit_sample(ids, mask, max_len, overlong, stats)
        if kept is None:
            continue
        ids, mask = kept
        table.add(len(lengths), [store.put(m) for m in media], where)
        if media:
            media_items += len(media)
            longest = max(longest, len(ids))
        ids_parts.append(ids)
        mask_parts.append(mask)
        lengths.append(len(ids))
    stats.dropped_overlong += dropped_media
    meta = {
        "target": target_name,
        "inputs": [str(p) for p in inputs],
        "max_len": max_len,
        "overlong": overlong,
        "regenerated": False,
        "media": {
            "kind": processor.kind,
            "samples_with_media": len(table.samples),
            "media_items": media_items,
            "distinct_media": len({r.sha256 for refs in table.samples.values() for r in refs}),
            "dropped_overlong_with_media": dropped_media,
            "max_sample_tokens": longest,
        },
    }
    table.save(out)  # before meta.json, which marks the folder complete
    save_prepared(
        out, ids_parts, mask_parts, lengths, processor.tokenizer, stats, draft_vocab_size, meta, t0
    )
    log.info(
        "prepared %d samples (%d with %s, %d media items), %d tokens (%d supervised); "
        "dropped %d overlong samples with media, %d other bad; %d held out",
        stats.samples,
        len(table.samples),
        processor.kind,
        media_items,
        stats.tokens,
        stats.supervised_tokens,
        dropped_media,
        stats.template_errors,
        stats.heldout,
    )
    return stats
