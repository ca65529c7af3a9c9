"""The shard format's definitions: constants, dtype tables, the per-token fields, a shard file's
header and byte layout, the capture config, and the manifest. The spec they implement is the
docstring of :mod:`specfast.shards`; writer, dataset and reader all build on this module."""

from __future__ import annotations

import contextlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from specfast import _shardio
from specfast.conventions import AUX_LAYER_CONVENTION, HIDDEN_DTYPES

FORMAT = "specfast-shards"  # manifest.json
SHARD_FORMAT = "specfast-shard"  # each shard's __metadata__
VERSION = 1
ALIGN = 4096
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 256 << 20
MAX_HEADER = 100 << 20  # safetensors' own limit
SHARD_NAME = re.compile(r"^shard-(\d{6})\.safetensors$")

# safetensors dtype codes. Format-specific, so they live here and not in specfast.conventions.
ST_CODES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
ST_TORCH: dict[str, torch.dtype] = {code: dtype for dtype, code in ST_CODES.items()}
ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "BOOL": 1, "U8": 1, "U64": 8}
FLOAT_CODES = ("BF16", "F16", "F32")
# Stored dtype of input_ids / target_argmax, by manifest name.
INDEX_DTYPES = {"int32": "I32", "int64": "I64"}

_CAPTURE_REQUIRED = {
    "target": str,
    "aux_layer_ids": list,
    "aux_layer_convention": str,
    "hidden_size": int,
    "tokenizer_hash": str,
}
_CAPTURE_OPTIONAL = {"dtype": str, "extra": dict}


class ShardError(ValueError):
    """Shard data is unusable: truncated, corrupt, missing, or not what the caller expects."""


@contextlib.contextmanager
def native_errors() -> Iterator[None]:
    """Turn the extension's data errors into ShardError (its OS errors stay OSError)."""
    try:
        yield
    except _shardio.ShardIOError as e:
        raise ShardError(str(e)) from None


def round_up(n: int) -> int:
    """n rounded up to the next multiple of ALIGN."""
    return -(-n // ALIGN) * ALIGN


def hex64(v: int) -> str:
    """A 64-bit checksum as the manifest spells it: 16 lowercase hex digits."""
    return f"{v:016x}"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


# ----------------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Field:
    """One per-token tensor: its name, safetensors dtype, and shape per token."""

    name: str
    st_dtype: str
    token_shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_TORCH[self.st_dtype]

    @property
    def bytes_per_token(self) -> int:
        return ST_ITEMSIZE[self.st_dtype] * int(np.prod(self.token_shape, dtype=np.int64))

    def to_json(self) -> dict:
        return {"dtype": self.st_dtype, "token_shape": list(self.token_shape)}


def make_fields(capture: dict, index_dtype: str, present=()) -> list[Field]:
    """The per-token tensors of a dataset, in file order; of the optional ones (`target_argmax`,
    `positions`), those named in `present` (any container of names: a sample, a fields dict)."""
    h, k = capture["hidden_size"], len(capture["aux_layer_ids"])
    hid = ST_CODES[HIDDEN_DTYPES[capture["dtype"]]]
    idx = INDEX_DTYPES[index_dtype]
    fields = [
        Field("aux_hidden", hid, (k * h,)),
        Field("final_hidden", hid, (h,)),
        Field("input_ids", idx, ()),
        Field("loss_mask", "BOOL", ()),
    ]
    if "target_argmax" in present:
        fields.append(Field("target_argmax", idx, ()))
    if "positions" in present:  # the draft's RoPE positions, where the target has its own (mRoPE)
        fields.append(Field("positions", idx, ()))
    return fields


# ----------------------------------------------------------------------------- shard files


def shard_file(
    blocks: list[tuple[Field, list[np.ndarray]]],
    offsets: np.ndarray,
    checksums: np.ndarray,
    capture: dict,
) -> tuple[bytes, list]:
    """A shard's header region (length prefix + padded JSON) and all its parts, as the C++
    writer takes them: buffers, or ints meaning that many zero bytes. `blocks` holds each
    per-token field with its samples' raw bytes.

    Parts: the header, then each tensor followed by its ``pad.<name>`` filler up to the next
    4 KiB boundary (safetensors rejects gaps between tensors, so padding must be a tensor)."""
    num_tokens, num_samples = int(offsets[-1]), len(checksums)
    meta = {
        "format": SHARD_FORMAT,
        "version": str(VERSION),
        "samples": str(num_samples),
        "tokens": str(num_tokens),
        "hidden_size": str(capture["hidden_size"]),
        "aux_layer_ids": json.dumps(capture["aux_layer_ids"]),
        "aux_layer_convention": capture["aux_layer_convention"],
    }
    tensors = [(f.name, f.st_dtype, [num_tokens, *f.token_shape], arrays) for f, arrays in blocks]
    tensors += [
        ("offsets", "I64", [num_samples + 1], [offsets]),
        ("sample_checksum", "U64", [num_samples], [checksums]),
    ]
    header: dict[str, Any] = {"__metadata__": meta}
    body: list = []
    pos = 0
    for name, st_dtype, shape, arrays in tensors:
        nbytes = sum(a.nbytes for a in arrays)
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        body += arrays
        pos += nbytes
        pad = round_up(pos) - pos
        if pad:
            header[f"pad.{name}"] = {
                "dtype": "U8",
                "shape": [pad],
                "data_offsets": [pos, pos + pad],
            }
            body.append(pad)
            pos += pad
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (round_up(8 + len(text)) - 8 - len(text))
    region = struct.pack("<Q", len(text)) + text
    return region, [region] + body


# ----------------------------------------------------------------------------- capture config


def normalize_capture(config: Any, where: str, dtype: str | None = None) -> dict:
    """Validated copy of a capture config, with ``dtype`` and ``extra`` filled in."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: capture config must be a dict, got {type(config).__name__}")
    unknown = set(config) - set(_CAPTURE_REQUIRED) - set(_CAPTURE_OPTIONAL)
    if unknown:
        raise ValueError(
            f"{where}: unknown capture config keys {sorted(unknown)}; "
            f"put free-form information under 'extra'"
        )
    for key, typ in {**_CAPTURE_REQUIRED, **_CAPTURE_OPTIONAL}.items():
        if key not in config:
            if key in _CAPTURE_REQUIRED:
                raise ValueError(f"{where}: capture config lacks {key!r}")
            continue
        value = config[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(
                f"{where}: capture config {key!r} must be {typ.__name__}, got {value!r}"
            )
    out = {k: config[k] for k in _CAPTURE_REQUIRED}
    out["aux_layer_ids"] = list(out["aux_layer_ids"])
    ids = out["aux_layer_ids"]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(
            f"{where}: aux_layer_ids must be a non-empty list of 0-based layer indices, got {ids!r}"
        )
    if out["aux_layer_convention"] != AUX_LAYER_CONVENTION:
        raise ValueError(
            f"{where}: aux_layer_convention is {out['aux_layer_convention']!r}; shards store "
            f"{AUX_LAYER_CONVENTION!r} (entry i = output of 0-based layer aux_layer_ids[i]). "
            f"vLLM's ids name a layer's input: convert with ours = vllm - 1"
        )
    if out["hidden_size"] <= 0:
        raise ValueError(f"{where}: hidden_size must be positive, got {out['hidden_size']}")
    given = config.get("dtype")
    if dtype is not None and given is not None and dtype != given:
        raise ValueError(f"{where}: dtype={dtype!r} disagrees with capture config dtype {given!r}")
    out["dtype"] = dtype or given or "bfloat16"
    if out["dtype"] not in HIDDEN_DTYPES:
        raise ValueError(
            f"{where}: dtype must be one of {sorted(HIDDEN_DTYPES)}, got {out['dtype']!r}"
        )
    out["extra"] = dict(config.get("extra", {}))
    try:
        json.dumps(out["extra"])
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{where}: capture config 'extra' must be JSON-serialisable: {e}"
        ) from None
    return out


def capture_diff(have: dict, want: Mapping) -> list[str]:
    """Human-readable differences for the keys of `want`."""
    diffs = []
    for key, value in want.items():
        if key not in have:
            raise ValueError(f"unknown capture key {key!r}; known: {sorted(have)}")
        expected = list(value) if key == "aux_layer_ids" else value
        if have[key] != expected:
            diffs.append(f"{key} is {have[key]!r}, expected {expected!r}")
    return diffs


# ----------------------------------------------------------------------------- manifest


def new_manifest(capture: dict, index_dtype: str | None, shard_tokens: int | None) -> dict:
    """The manifest of a capture that has written nothing yet."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "capture": capture,
        "layout": {
            "alignment": ALIGN,
            "checksum": "xxh64",
            "index_dtype": index_dtype or "int32",
            "shard_tokens": shard_tokens,
            "fields": None,
        },
        "totals": {"shards": 0, "samples": 0, "tokens": 0, "bytes": 0},
        "shards": [],
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    """Crash-safe: readers see the old manifest or the new one, never a torn one."""
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    _shardio.write_file_atomic(str(directory / MANIFEST), [data])


def load_manifest(directory: Path) -> dict:
    """Read and check manifest.json; every problem is a ShardError naming the file."""
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(
            f"{path} does not exist: {directory} is not a shard dataset "
            f"(or its capture never got going)"
        ) from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None

    def bad(what: str) -> ShardError:
        return ShardError(f"{path}: {what}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"not a specfast shard manifest (format must be {FORMAT!r})")
    if m.get("version") != VERSION:
        raise bad(f"version {m.get('version')!r} is not supported (this specfast reads {VERSION})")
    for key, typ in (
        ("complete", bool),
        ("capture", dict),
        ("layout", dict),
        ("totals", dict),
        ("shards", list),
    ):
        if not isinstance(m.get(key), typ):
            raise bad(f"{key!r} missing or not a {typ.__name__}")
    try:
        m["capture"] = normalize_capture(m["capture"], str(path))
    except ValueError as e:
        raise ShardError(str(e)) from None
    _check_layout(m, bad)
    _check_shard_list(m, bad)
    return m


def _check_layout(m: dict, bad) -> None:
    layout = m["layout"]
    if layout.get("alignment") != ALIGN or layout.get("checksum") != "xxh64":
        raise bad("layout must have alignment 4096 and checksum 'xxh64'")
    if layout.get("index_dtype") not in INDEX_DTYPES:
        raise bad(f"layout index_dtype must be one of {sorted(INDEX_DTYPES)}")
    st = layout.get("shard_tokens")
    if st is not None and (not isinstance(st, int) or isinstance(st, bool) or st < 1):
        raise bad(f"layout shard_tokens must be a positive int or null, got {st!r}")
    fields = layout.get("fields")
    if fields is not None:
        present = fields if isinstance(fields, dict) else ()
        want = {
            f.name: f.to_json() for f in make_fields(m["capture"], layout["index_dtype"], present)
        }
        if fields != want:
            raise bad(f"layout fields {fields!r} disagree with the capture config ({want!r})")
    elif m["shards"]:
        raise bad("lists shards but no layout fields")


def _check_shard_list(m: dict, bad) -> None:
    samples = tokens = nbytes = 0
    for i, s in enumerate(m["shards"]):
        ok = (
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and SHARD_NAME.match(s["file"]) is not None
            and all(isinstance(s.get(k), int) and s[k] > 0 for k in ("samples", "tokens", "bytes"))
            and all(
                isinstance(s.get(k), str) and re.fullmatch(r"[0-9a-f]{16}", s[k])
                for k in ("xxh64", "header_xxh64", "index_xxh64")
            )
        )
        if not ok:
            raise bad(f"shards[{i}] is malformed: {s!r}")
        if s["file"] != shard_name(i):
            raise bad(f"shards[{i}] is {s['file']!r}, expected {shard_name(i)!r}")
        samples, tokens, nbytes = samples + s["samples"], tokens + s["tokens"], nbytes + s["bytes"]
    want = {"shards": len(m["shards"]), "samples": samples, "tokens": tokens, "bytes": nbytes}
    if m["totals"] != want:
        raise bad(f"totals {m['totals']!r} disagree with the shard list ({want!r})")
