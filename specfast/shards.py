"""Hidden-state shards: capture a target's hidden states once, train many epochs from disk.

The Python API over the C++ extension ``specfast._shardio``:

- :class:`ShardWriter` writes samples into shards, crash-safe and resumable.
- :class:`ShardDataset` opens a shard directory, checks it against what the caller expects, and
  reads single samples.
- :class:`ShardReader` streams one epoch as packed, shuffled, verified batches, read by C++
  threads into (optionally pinned) host buffers, resumable from :meth:`ShardReader.position`.
- :class:`ShardError` (a ``ValueError``) is the one exception for bad data: truncated, corrupt,
  missing or mismatched shards. Its message names the file, and the sample where there is one.

Usage::

    with ShardWriter(out_dir, capture_config) as w:            # resumes an interrupted capture
        for sample in samples[w.num_samples_done:]:            # dicts of numpy / torch tensors
            w.add(sample)

    ds = ShardDataset(out_dir, expect={"hidden_size": 576, "aux_layer_ids": [1, 13, 26],
                                       "tokenizer_hash": tok_hash, "dtype": "bfloat16"})
    for epoch in range(start_epoch, epochs):
        start = start_position if epoch == start_epoch else 0
        with ShardReader(ds, token_budget=16384, seed=seed, epoch=epoch, start=start,
                         pin_memory=torch.cuda.is_available()) as reader:
            for batch in reader:      # aux_hidden [T, 3H], final_hidden [T, H], input_ids [T],
                ...                   # loss_mask [T], (target_argmax [T]), offsets [B+1], sample_ids [B]
                checkpoint_state = {"epoch": epoch, "position": reader.position()}

Format (version 1)
==================

A dataset is a directory::

    manifest.json
    shard-000000.safetensors
    shard-000001.safetensors
    ...

Shard files
-----------
Every shard is a valid safetensors file (``safetensors.safe_open`` opens it) holding S >= 1
samples with N tokens in all. Per-token tensors are the samples concatenated along the token
axis; ``offsets`` gives the sample boundaries.

=================  ============  =====================  =============================================
tensor             shape         dtype                  meaning
=================  ============  =====================  =============================================
``aux_hidden``     [N, K*H]      BF16 / F16 / F32       K target hidden states, concatenated (K = 3
                                                        for EAGLE-3), in ``aux_layer_ids`` order
``final_hidden``   [N, H]        same as aux_hidden     the target's last hidden state *after* its
                                                        final norm, i.e. what its lm_head consumes
                                                        (HF ``hidden_states[-1]``), so that
                                                        ``final_hidden @ lm_head.weight.T`` equals
                                                        the target's logits
``input_ids``      [N]           I32 (default) / I64    token ids
``loss_mask``      [N]           BOOL                   True where the token is supervised
``target_argmax``  [N]           I32 / I64, optional    the target's full-vocabulary argmax per
                                                        token (saves recomputing it in training)
``offsets``        [S+1]         I64                    sample j is tokens [offsets[j], offsets[j+1])
``sample_checksum``[S]           U64                    xxh64 (seed 0) of sample j's bytes in the
                                                        per-token tensors, in the order above
``pad.<name>``     [p]           U8                     zero padding after tensor <name>, 1..4095 B
=================  ============  =====================  =============================================

Alignment. The JSON header is padded with spaces so that the data starts at a multiple of 4096
bytes. safetensors requires the data region to be covered exactly, with no holes between tensors
and nothing after the last one (``safe_open`` rejects both; verified), so alignment cannot come
from gaps: after every tensor whose end is not a multiple of 4096, a ``pad.<name>`` U8 tensor
fills the gap to the next 4 KiB boundary. Every tensor, and the end of the file, is therefore
4 KiB aligned (a reader may use O_DIRECT or GPUDirect Storage on them; specfast's own reader
reads through the page cache); the cost is < 4 KiB per tensor per shard.
Tensors appear in the order of the table. ``__metadata__`` holds ``format`` ("specfast-shard"),
``version``, ``samples``, ``tokens``, ``hidden_size``, ``aux_layer_ids`` (JSON list) and
``aux_layer_convention``, so a shard copied out alone still says what it holds.

Aux layer convention. ``aux_layer_ids`` are 0-based decoder-layer indices and entry i is the
*output* of layer ``aux_layer_ids[i]`` (HF ``output_hidden_states`` index ``aux_layer_ids[i] + 1``;
for the last layer that HF entry is after the final norm, so capture it with a hook). vLLM's
``eagle_aux_hidden_state_layer_ids`` name the *input* of a layer instead: vLLM's ``j`` is our
``j - 1``. The manifest records this as ``"aux_layer_convention": "layer_output_0based"``
(:data:`AUX_LAYER_CONVENTION`); the writer accepts nothing else, so a capture that mixed them up
must say so explicitly and fail, not train a silently bad draft.

manifest.json
-------------
::

    {"format": "specfast-shards", "version": 1,
     "complete": true,              # false while a capture runs or after it died
     "capture": {"target": "...", "aux_layer_ids": [1, 14, 26],
                 "aux_layer_convention": "layer_output_0based", "hidden_size": 576,
                 "dtype": "bfloat16", "tokenizer_hash": "...", "extra": {...}},
     "layout": {"alignment": 4096, "checksum": "xxh64", "shard_tokens": 58254,
                "fields": {"aux_hidden": {"dtype": "BF16", "token_shape": [1728]}, ...}},
     "totals": {"shards": 2, "samples": 120, "tokens": 98765, "bytes": 455086080},
     "shards": [{"file": "shard-000000.safetensors", "samples": 61, "tokens": 58100,
                 "bytes": 267767808, "xxh64": "<hex16>", "header_xxh64": "<hex16>",
                 "index_xxh64": "<hex16>"}, ...]}

``xxh64`` covers the whole file (``ShardDataset.verify``), ``header_xxh64`` the first bytes up to
the data start (length prefix and padded JSON), ``index_xxh64`` the ``offsets`` bytes followed by
the ``sample_checksum`` bytes. Opening a dataset checks sizes, headers and indexes; reading checks
each sample against ``sample_checksum``. Together every byte a reader uses is verified.

Crash safety. Each shard and the manifest are written to ``.<name>.tmp``, fsynced, renamed into
place, and the directory fsynced. The manifest is the commit point: a shard exists for readers only
once it is listed there. A writer reopened on the directory keeps the listed shards, deletes temp
files and unlisted shard files left by a killed run, and reports ``num_samples_done`` so the
capture skips what is already stored. Shard boundaries depend only on the sample stream and
``shard_tokens``, so a killed-and-resumed capture produces the same files as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from specfast import _shardio

logger = logging.getLogger(__name__)

FORMAT = "specfast-shards"
SHARD_FORMAT = "specfast-shard"
VERSION = 1
ALIGN = 4096
AUX_LAYER_CONVENTION = "layer_output_0based"
MANIFEST = "manifest.json"
DEFAULT_SHARD_BYTES = 256 << 20
_SHARD_NAME = re.compile(r"^shard-(\d{6})\.safetensors$")
_MAX_HEADER = 100 << 20  # safetensors' own limit

# name -> (torch dtype, safetensors dtype)
HIDDEN_DTYPES = {
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "float32": (torch.float32, "F32"),
}
INDEX_DTYPES = {"int32": (torch.int32, "I32"), "int64": (torch.int64, "I64")}
_ST_TORCH = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}
_ST_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "BOOL": 1, "U8": 1, "U64": 8}

_CAPTURE_REQUIRED = {"target": str, "aux_layer_ids": list, "aux_layer_convention": str,
                     "hidden_size": int, "tokenizer_hash": str}
_CAPTURE_OPTIONAL = {"dtype": str, "extra": dict}


class ShardError(ValueError):
    """Shard data is unusable: truncated, corrupt, missing, or not what the caller expects."""


@contextlib.contextmanager
def _native_errors() -> Iterator[None]:
    """Turn the extension's data errors into ShardError (its OS errors stay OSError)."""
    try:
        yield
    except _shardio.ShardIOError as e:
        raise ShardError(str(e)) from None


@dataclass(frozen=True)
class _Field:
    """One per-token tensor: its name, safetensors dtype, and shape per token."""

    name: str
    st_dtype: str
    token_shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _ST_TORCH[self.st_dtype]

    @property
    def bytes_per_token(self) -> int:
        return _ST_ITEMSIZE[self.st_dtype] * int(np.prod(self.token_shape, dtype=np.int64))

    def to_json(self) -> dict:
        return {"dtype": self.st_dtype, "token_shape": list(self.token_shape)}


def _make_fields(capture: dict, index_dtype: str, with_argmax: bool) -> list[_Field]:
    h, k = capture["hidden_size"], len(capture["aux_layer_ids"])
    hid = HIDDEN_DTYPES[capture["dtype"]][1]
    idx = INDEX_DTYPES[index_dtype][1]
    fields = [_Field("aux_hidden", hid, (k * h,)), _Field("final_hidden", hid, (h,)),
              _Field("input_ids", idx, ()), _Field("loss_mask", "BOOL", ())]
    if with_argmax:
        fields.append(_Field("target_argmax", idx, ()))
    return fields


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _hex(v: int) -> str:
    return f"{v:016x}"


# ----------------------------------------------------------------------------- capture config

def _normalize_capture(config: Any, where: str, dtype: str | None = None) -> dict:
    """Validated copy of a capture config, with ``dtype`` and ``extra`` filled in."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: capture config must be a dict, got {type(config).__name__}")
    unknown = set(config) - set(_CAPTURE_REQUIRED) - set(_CAPTURE_OPTIONAL)
    if unknown:
        raise ValueError(f"{where}: unknown capture config keys {sorted(unknown)}; "
                         f"put free-form information under 'extra'")
    for key, typ in {**_CAPTURE_REQUIRED, **_CAPTURE_OPTIONAL}.items():
        if key not in config:
            if key in _CAPTURE_REQUIRED:
                raise ValueError(f"{where}: capture config lacks {key!r}")
            continue
        value = config[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"{where}: capture config {key!r} must be {typ.__name__}, "
                             f"got {value!r}")
    out = {k: config[k] for k in _CAPTURE_REQUIRED}
    out["aux_layer_ids"] = list(out["aux_layer_ids"])
    ids = out["aux_layer_ids"]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{where}: aux_layer_ids must be a non-empty list of 0-based layer "
                         f"indices, got {ids!r}")
    if out["aux_layer_convention"] != AUX_LAYER_CONVENTION:
        raise ValueError(
            f"{where}: aux_layer_convention is {out['aux_layer_convention']!r}; shards store "
            f"{AUX_LAYER_CONVENTION!r} (entry i = output of 0-based layer aux_layer_ids[i]). "
            f"vLLM's ids name a layer's input: convert with ours = vllm - 1")
    if out["hidden_size"] <= 0:
        raise ValueError(f"{where}: hidden_size must be positive, got {out['hidden_size']}")
    given = config.get("dtype")
    if dtype is not None and given is not None and dtype != given:
        raise ValueError(f"{where}: dtype={dtype!r} disagrees with capture config dtype {given!r}")
    out["dtype"] = dtype or given or "bfloat16"
    if out["dtype"] not in HIDDEN_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {sorted(HIDDEN_DTYPES)}, "
                         f"got {out['dtype']!r}")
    out["extra"] = dict(config.get("extra", {}))
    try:
        json.dumps(out["extra"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: capture config 'extra' must be JSON-serialisable: {e}") from None
    return out


def _capture_diff(have: dict, want: Mapping) -> list[str]:
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

def _write_manifest(directory: Path, manifest: dict) -> None:
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    _shardio.write_file_atomic(str(directory / MANIFEST), [data])


def _load_manifest(directory: Path) -> dict:
    """Read and check manifest.json; every problem is a ShardError naming the file."""
    path = directory / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ShardError(f"{path} does not exist: {directory} is not a shard dataset "
                         f"(or its capture never got going)") from None
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
    for key, typ in (("complete", bool), ("capture", dict), ("layout", dict),
                     ("totals", dict), ("shards", list)):
        if not isinstance(m.get(key), typ):
            raise bad(f"{key!r} missing or not a {typ.__name__}")
    try:
        m["capture"] = _normalize_capture(m["capture"], str(path))
    except ValueError as e:
        raise ShardError(str(e)) from None
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
        with_argmax = isinstance(fields, dict) and "target_argmax" in fields
        want = {f.name: f.to_json()
                for f in _make_fields(m["capture"], layout["index_dtype"], with_argmax)}
        if fields != want:
            raise bad(f"layout fields {fields!r} disagree with the capture config ({want!r})")
    elif m["shards"]:
        raise bad("lists shards but no layout fields")
    samples = tokens = nbytes = 0
    for i, s in enumerate(m["shards"]):
        ok = (isinstance(s, dict) and isinstance(s.get("file"), str)
              and _SHARD_NAME.match(s["file"]) is not None
              and all(isinstance(s.get(k), int) and s[k] > 0 for k in ("samples", "tokens", "bytes"))
              and all(isinstance(s.get(k), str) and re.fullmatch(r"[0-9a-f]{16}", s[k])
                      for k in ("xxh64", "header_xxh64", "index_xxh64")))
        if not ok:
            raise bad(f"shards[{i}] is malformed: {s!r}")
        if s["file"] != _shard_name(i):
            raise bad(f"shards[{i}] is {s['file']!r}, expected {_shard_name(i)!r}")
        samples, tokens, nbytes = samples + s["samples"], tokens + s["tokens"], nbytes + s["bytes"]
    want_totals = {"shards": len(m["shards"]), "samples": samples, "tokens": tokens, "bytes": nbytes}
    if m["totals"] != want_totals:
        raise bad(f"totals {m['totals']!r} disagree with the shard list ({want_totals!r})")
    return m


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


# ----------------------------------------------------------------------------- writer

class ShardWriter:
    """Writes samples into shards under ``out_dir``; crash-safe, resumable.

    ``capture_config`` needs ``target`` (name or path), ``aux_layer_ids`` (0-based layer
    indices), ``aux_layer_convention`` (must be :data:`AUX_LAYER_CONVENTION`), ``hidden_size``,
    ``tokenizer_hash``; optionally ``dtype`` and ``extra`` (free-form, JSON-serialisable).
    ``dtype`` is the stored dtype of the hidden states ("bfloat16" unless given here or in the
    config). ``index_dtype`` stores ``input_ids`` / ``target_argmax``. A shard closes before a
    sample that would take it past ``shard_tokens`` (default: about 256 MiB of data); a sample
    longer than that gets a shard of its own.

    Opening a directory that already holds a manifest resumes it: the capture config must match,
    listed shards are kept, leftovers of a killed run removed, and :attr:`num_samples_done` says
    how many input samples to skip. Only one writer may hold a directory (a lock file enforces it).

    ``add()`` copies its input, so the caller may reuse its buffers. Shards are written on a
    background thread while the caller keeps adding. ``close()`` (or leaving the ``with`` block)
    writes the last shard and marks the manifest complete; leaving the block on an exception
    keeps what is committed and drops the unwritten remainder, exactly like a crash.
    """

    def __init__(self, out_dir: str | os.PathLike, capture_config: Mapping[str, Any], *,
                 shard_tokens: int | None = None, dtype: str | None = None,
                 index_dtype: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        if shard_tokens is not None and (not isinstance(shard_tokens, int) or shard_tokens < 1):
            raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        if index_dtype is not None and index_dtype not in INDEX_DTYPES:
            raise ValueError(f"index_dtype must be one of {sorted(INDEX_DTYPES)}, got {index_dtype!r}")
        capture = _normalize_capture(capture_config, "ShardWriter", dtype)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._lock()
        try:
            self._open(capture, shard_tokens, index_dtype)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._native = _shardio.FileWriter()
        self._inflight: tuple[dict, list] | None = None  # (manifest entry so far, kept buffers)
        self._pending: list[tuple[dict[str, np.ndarray], int, int]] = []  # (bytes, tokens, xxh64)
        self._pending_tokens = 0
        self._closed = False

    # -- opening and resuming

    def _lock(self) -> int:
        fd = os.open(self.out_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ShardError(f"{self.out_dir} is being written by another ShardWriter "
                             f"(its .lock is held)") from None
        return fd

    def _open(self, capture: dict, shard_tokens: int | None, index_dtype: str | None) -> None:
        if (self.out_dir / MANIFEST).exists():
            m = _load_manifest(self.out_dir)
            diffs = _capture_diff(m["capture"], capture)
            if diffs:
                raise ShardError(f"{self.out_dir / MANIFEST} was captured with a different config "
                                 f"(" + "; ".join(diffs) + "); write to a new directory")
            stored_index = m["layout"]["index_dtype"]
            if index_dtype is not None and index_dtype != stored_index:
                raise ShardError(f"{self.out_dir / MANIFEST} stores index_dtype {stored_index!r}, "
                                 f"got {index_dtype!r}")
            for entry in m["shards"]:
                path = self.out_dir / entry["file"]
                size = path.stat().st_size if path.exists() else None
                if size != entry["bytes"]:
                    state = "is missing" if size is None else f"has {size} bytes"
                    raise ShardError(f"cannot resume: {path} {state}, manifest says "
                                     f"{entry['bytes']} bytes")
            self._manifest = m
            self.shard_tokens = shard_tokens or m["layout"].get("shard_tokens")
            if m["shards"]:
                logger.info("resuming %s after %d shards, %d samples", self.out_dir,
                            len(m["shards"]), m["totals"]["samples"])
        else:
            self._manifest = {
                "format": FORMAT, "version": VERSION, "complete": False, "capture": capture,
                "layout": {"alignment": ALIGN, "checksum": "xxh64",
                           "index_dtype": index_dtype or "int32", "shard_tokens": shard_tokens,
                           "fields": None},
                "totals": {"shards": 0, "samples": 0, "tokens": 0, "bytes": 0},
                "shards": [],
            }
            self.shard_tokens = shard_tokens
        self._remove_leftovers()
        self._manifest["complete"] = False
        _write_manifest(self.out_dir, self._manifest)
        fields = self._manifest["layout"]["fields"]
        self._fields = None if fields is None else _make_fields(
            capture, self._manifest["layout"]["index_dtype"], "target_argmax" in fields)

    def _remove_leftovers(self) -> None:
        """Delete temp files and unlisted shards of a killed run (never anything else)."""
        listed = {s["file"] for s in self._manifest["shards"]}
        for p in sorted(self.out_dir.iterdir()):
            stray_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            unlisted = _SHARD_NAME.match(p.name) is not None and p.name not in listed
            if stray_tmp or unlisted:
                logger.warning("removing %s left by an interrupted capture", p)
                p.unlink()

    @property
    def num_samples_done(self) -> int:
        """Samples durably committed to the manifest (on opening: how many inputs to skip)."""
        return self._manifest["totals"]["samples"]

    @property
    def manifest(self) -> dict:
        return self._manifest

    # -- adding samples

    def add(self, sample: Mapping[str, Any]) -> None:
        """Add one sample: ``input_ids`` [n], ``loss_mask`` [n], ``aux_hidden`` [n, K*H],
        ``final_hidden`` [n, H], optionally ``target_argmax`` [n]; numpy arrays or torch tensors
        (any device). Hidden states are cast to the stored dtype."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        self._poll()
        index = self.num_samples_done + len(self._pending) + self._inflight_samples()
        where = f"ShardWriter.add (sample {index})"
        if not isinstance(sample, Mapping):
            raise ValueError(f"{where}: sample must be a dict of tensors, got {type(sample).__name__}")
        if self._fields is None:
            self._fields = _make_fields(self._manifest["capture"],
                                        self._manifest["layout"]["index_dtype"],
                                        "target_argmax" in sample)
            self._manifest["layout"]["fields"] = {f.name: f.to_json() for f in self._fields}
        arrays, n = self._convert(sample, where)
        if self.shard_tokens is None:
            bpt = sum(f.bytes_per_token for f in self._fields)
            self.shard_tokens = max(1, DEFAULT_SHARD_BYTES // bpt)
            self._manifest["layout"]["shard_tokens"] = self.shard_tokens
        if self._pending and self._pending_tokens + n > self.shard_tokens:
            self._flush()
        checksum = _shardio.xxh64_parts([arrays[f.name] for f in self._fields])
        self._pending.append((arrays, n, checksum))
        self._pending_tokens += n

    def _convert(self, sample: Mapping[str, Any], where: str) -> tuple[dict[str, np.ndarray], int]:
        """Validated, owned, contiguous copies of the sample's tensors, as raw bytes."""
        names = {f.name for f in self._fields}
        if set(sample) != names:
            missing, extra = sorted(names - set(sample)), sorted(set(sample) - names)
            raise ValueError(f"{where}: sample keys must be {sorted(names)} "
                             f"(missing {missing}, unexpected {extra})")
        ids = _as_tensor(sample["input_ids"], f"{where}: input_ids")
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"{where}: input_ids must have shape [n] with n >= 1, "
                             f"got {list(ids.shape)}")
        n = ids.numel()
        out = {}
        for f in self._fields:
            t = ids if f.name == "input_ids" else _as_tensor(sample[f.name], f"{where}: {f.name}")
            shape = [n, *f.token_shape]
            if list(t.shape) != shape:
                raise ValueError(f"{where}: {f.name} has shape {list(t.shape)}, expected {shape}")
            t = _check_values(t, f, f"{where}: {f.name}")
            t = t.to(device="cpu", dtype=f.torch_dtype, memory_format=torch.contiguous_format,
                     copy=True)
            raw = t.view(torch.uint8).numpy().reshape(-1)
            if f.st_dtype in ("BF16", "F16", "F32"):  # checked after the cast: it can overflow
                bad = _shardio.first_nonfinite(raw, f.st_dtype)
                if bad >= 0:
                    raise ValueError(f"{where}: {f.name} holds NaN or inf at token "
                                     f"{bad // t[0].numel()} (after casting to {f.st_dtype})")
            out[f.name] = raw
        return out, n

    def _inflight_samples(self) -> int:
        return self._inflight[0]["samples"] if self._inflight else 0

    # -- writing shards

    def _flush(self) -> None:
        """Start writing the pending samples as the next shard (after the one in flight)."""
        self._commit_inflight()
        index = len(self._manifest["shards"])
        lengths = np.array([n for _, n, _ in self._pending], dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        checksums = np.array([c for _, _, c in self._pending], dtype=np.uint64)
        blocks = [(f, [a[f.name] for a, _, _ in self._pending]) for f in self._fields]
        capture = self._manifest["capture"]
        meta = {"format": SHARD_FORMAT, "version": str(VERSION), "samples": str(len(lengths)),
                "tokens": str(int(offsets[-1])), "hidden_size": str(capture["hidden_size"]),
                "aux_layer_ids": json.dumps(capture["aux_layer_ids"]),
                "aux_layer_convention": capture["aux_layer_convention"]}
        header, parts = _shard_layout(blocks, offsets, checksums, meta)
        entry = {"file": _shard_name(index), "samples": len(lengths), "tokens": int(offsets[-1]),
                 "bytes": 0, "xxh64": "", "header_xxh64": _hex(_shardio.xxh64(header)),
                 "index_xxh64": _hex(_shardio.xxh64_parts([offsets, checksums]))}
        self._native.start(str(self.out_dir / entry["file"]), parts)
        self._inflight = (entry, parts)
        self._pending, self._pending_tokens = [], 0

    def _poll(self) -> None:
        if self._inflight and self._native.finished():
            self._commit_inflight()

    def _commit_inflight(self) -> None:
        """Wait for the shard in flight, then list it in the manifest (the commit point)."""
        if self._inflight is None:
            return
        entry, _ = self._inflight
        self._inflight = None
        size, checksum = self._native.wait()
        entry["bytes"], entry["xxh64"] = size, _hex(checksum)
        m = self._manifest
        m["shards"].append(entry)
        t = m["totals"]
        t["shards"] += 1
        t["samples"] += entry["samples"]
        t["tokens"] += entry["tokens"]
        t["bytes"] += size
        _write_manifest(self.out_dir, m)

    # -- closing

    def close(self) -> None:
        """Write what is pending, wait for it, mark the dataset complete. Idempotent."""
        if self._closed:
            return
        try:
            if self._pending:
                self._flush()
            self._commit_inflight()
            self._manifest["complete"] = True
            _write_manifest(self.out_dir, self._manifest)
        finally:
            self._release()

    def abort(self) -> None:
        """Stop without writing pending samples; committed shards stay, resumable later."""
        if self._closed:
            return
        try:
            self._commit_inflight()
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        self._pending, self._pending_tokens = [], 0
        os.close(self._lock_fd)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.abort()
            except Exception:  # the original exception matters more than a failed commit
                logger.exception("ShardWriter: committing the shard in flight failed")


def _as_tensor(x: Any, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))  # torch refuses negative strides
    raise ValueError(f"{where}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _check_values(t: torch.Tensor, f: _Field, where: str) -> torch.Tensor:
    """Reject values the stored dtype would silently corrupt."""
    if f.st_dtype in ("BF16", "F16", "F32"):
        if not t.is_floating_point():
            raise ValueError(f"{where}: expected floating point, got {t.dtype}")
    elif f.st_dtype == "BOOL":
        if t.dtype != torch.bool:
            if t.is_floating_point() or t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
                raise ValueError(f"{where}: must be bool or 0/1 integers, got {t.dtype}")
    else:
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{where}: must be integer token ids, got {t.dtype}")
        hi = torch.iinfo(f.torch_dtype).max
        if bool((t < 0).any()) or bool((t > hi).any()):
            raise ValueError(f"{where}: token ids must lie in [0, {hi}] "
                             f"(got {int(t.min())}..{int(t.max())})")
    return t


def _shard_layout(blocks: list[tuple[_Field, list[np.ndarray]]], offsets: np.ndarray,
                  checksums: np.ndarray, meta: dict) -> tuple[bytes, list]:
    """Header region (length prefix + padded JSON) and the file's parts for the C++ writer.

    Parts are buffers or ints (that many zero bytes): the header, then each tensor followed by
    its ``pad.<name>`` filler up to the next 4 KiB boundary."""
    num_tokens, num_samples = int(offsets[-1]), len(checksums)
    tensors = [(f.name, f.st_dtype, [num_tokens, *f.token_shape], arrays) for f, arrays in blocks]
    tensors += [("offsets", "I64", [num_samples + 1], [offsets]),
                ("sample_checksum", "U64", [num_samples], [checksums])]
    header: dict[str, Any] = {"__metadata__": meta}
    body: list = []
    pos = 0
    for name, st_dtype, shape, arrays in tensors:
        nbytes = sum(a.nbytes for a in arrays)
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
        body += arrays
        pos += nbytes
        pad = _round_up(pos) - pos
        if pad:
            header[f"pad.{name}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [pos, pos + pad]}
            body.append(pad)
            pos += pad
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (_round_up(8 + len(text)) - 8 - len(text))
    region = struct.pack("<Q", len(text)) + text
    return region, [region] + body


# ----------------------------------------------------------------------------- dataset

@dataclass
class _Shard:
    path: Path
    field_offsets: list[int]  # absolute file offsets of the per-token tensors
    token_offsets: np.ndarray  # int64 [S+1]
    checksums: np.ndarray  # uint64 [S]


class ShardDataset:
    """A shard directory, opened and checked.

    Opening reads the manifest and every shard's header and index (sizes, header checksums,
    index checksums, layout), so damage there fails here, naming the file. ``expect`` is a dict
    of capture-config keys (``target``, ``aux_layer_ids``, ``aux_layer_convention``,
    ``hidden_size``, ``dtype``, ``tokenizer_hash``, ``extra``) the data must match: a mismatch is
    a ShardError listing every difference. A capture that has not finished (``complete`` false)
    is refused unless ``allow_incomplete``.
    """

    def __init__(self, path: str | os.PathLike, expect: Mapping[str, Any] | None = None, *,
                 allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.manifest = _load_manifest(self.path)
        manifest_path = self.path / MANIFEST
        if expect is not None:
            if not isinstance(expect, Mapping):
                raise ValueError(f"expect must be a dict, got {type(expect).__name__}")
            diffs = _capture_diff(self.manifest["capture"], expect)
            if diffs:
                raise ShardError(f"{manifest_path} does not match what is expected: "
                                 + "; ".join(diffs))
        if not self.manifest["complete"] and not allow_incomplete:
            raise ShardError(f"{manifest_path}: the capture has not finished (complete: false); "
                             f"resume it, or pass allow_incomplete=True to read the "
                             f"{len(self.manifest['shards'])} shards written so far")
        layout = self.manifest["layout"]
        fields = layout["fields"] or {}
        self.fields = _make_fields(self.manifest["capture"], layout["index_dtype"],
                                   "target_argmax" in fields) if fields else []
        self._shards = [self._open_shard(e) for e in self.manifest["shards"]]
        lengths = [np.diff(s.token_offsets) for s in self._shards]
        self.sample_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._sample_base = np.cumsum([0] + [len(s.checksums) for s in self._shards])
        self._native_single: Any = None
        self._host_buffers: dict[tuple[int, bool], _HostBuffers] = {}

    @property
    def capture(self) -> dict:
        return self.manifest["capture"]

    @property
    def num_tokens(self) -> int:
        return int(self.sample_lengths.sum())

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def __len__(self) -> int:
        return len(self.sample_lengths)

    def locate(self, i: int) -> tuple[str, int]:
        """(shard file, index within it) of dataset sample i."""
        self._check_index(i)
        s = int(np.searchsorted(self._sample_base, i, side="right")) - 1
        return self._shards[s].path.name, i - int(self._sample_base[s])

    def _open_shard(self, entry: dict) -> _Shard:
        path = self.path / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"missing shard: {path} is listed in {self.path / MANIFEST} "
                             f"but does not exist") from None
        if size != entry["bytes"]:
            state = "truncated" if size < entry["bytes"] else "longer than recorded"
            raise ShardError(f"{path} is {state}: {size} bytes, the manifest says {entry['bytes']}")
        with open(path, "rb") as f:
            fd = f.fileno()
            prefix = os.pread(fd, 8, 0)
            if len(prefix) < 8:
                raise ShardError(f"{path}: damaged header: the file is only {size} bytes")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > min(size - 8, _MAX_HEADER):
                raise ShardError(f"{path}: damaged header: header length {hlen} does not fit "
                                 f"in a {size}-byte file")
            region = prefix + os.pread(fd, hlen, 8)
            if _hex(_shardio.xxh64(region)) != entry["header_xxh64"]:
                raise ShardError(f"{path}: damaged header: header checksum mismatch "
                                 f"(manifest says {entry['header_xxh64']})")
            try:
                header = json.loads(region[8:])
                offsets_at, checksums_at, field_offsets = self._check_header(header, entry, hlen,
                                                                             size)
            except (ValueError, KeyError, TypeError) as e:
                raise ShardError(f"{path}: damaged header: {e}") from None
            s = entry["samples"]
            off_bytes = os.pread(fd, 8 * (s + 1), offsets_at)
            sum_bytes = os.pread(fd, 8 * s, checksums_at)
        if _hex(_shardio.xxh64_parts([off_bytes, sum_bytes])) != entry["index_xxh64"]:
            raise ShardError(f"{path}: damaged index: the offsets / sample_checksum tensors do not "
                             f"match their checksum (manifest says {entry['index_xxh64']})")
        token_offsets = np.frombuffer(off_bytes, dtype="<i8").astype(np.int64)
        if token_offsets[0] != 0 or token_offsets[-1] != entry["tokens"] or \
                bool((np.diff(token_offsets) <= 0).any()):
            raise ShardError(f"{path}: offsets are not increasing from 0 to {entry['tokens']}")
        checksums = np.frombuffer(sum_bytes, dtype="<u8").astype(np.uint64)
        return _Shard(path, field_offsets, token_offsets, checksums)

    def _check_header(self, header: dict, entry: dict, hlen: int, size: int
                      ) -> tuple[int, int, list[int]]:
        """Absolute offsets of offsets, sample_checksum and the per-token tensors; raises
        ValueError on anything that is not the layout the manifest describes."""
        data_start = 8 + hlen
        if data_start % ALIGN:
            raise ValueError(f"data starts at byte {data_start}, not on a 4096-byte boundary")
        meta = header.get("__metadata__", {})
        if meta.get("format") != SHARD_FORMAT or meta.get("version") != str(VERSION):
            raise ValueError(f"__metadata__ {meta!r} is not a version-{VERSION} specfast shard")
        n, s = entry["tokens"], entry["samples"]
        want = [(f.name, f.st_dtype, [n, *f.token_shape]) for f in self.fields]
        want += [("offsets", "I64", [s + 1]), ("sample_checksum", "U64", [s])]
        starts = {}
        for name, st_dtype, shape in want:
            t = header.get(name)
            if not isinstance(t, dict):
                raise ValueError(f"tensor {name!r} is missing")
            begin, end = t["data_offsets"]
            nbytes = _ST_ITEMSIZE[st_dtype] * int(np.prod(shape, dtype=np.int64))
            if t["dtype"] != st_dtype or t["shape"] != shape or end - begin != nbytes:
                raise ValueError(f"tensor {name!r} is {t['dtype']} {t['shape']}, "
                                 f"expected {st_dtype} {shape}")
            if begin % ALIGN or data_start + end > size:
                raise ValueError(f"tensor {name!r} at data bytes [{begin}, {end}) is misaligned "
                                 f"or past the end of the file")
            starts[name] = data_start + begin
        return (starts["offsets"], starts["sample_checksum"],
                [starts[f.name] for f in self.fields])

    def _check_index(self, i: int) -> None:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
            raise IndexError(f"sample index {i!r} out of range [0, {len(self)})")

    def _native_reader(self, num_threads: int, verify: bool) -> Any:
        """A C++ reader over this dataset's shards (used by ShardReader)."""
        return _shardio.Reader(
            [str(s.path) for s in self._shards], [s.field_offsets for s in self._shards],
            [s.token_offsets for s in self._shards], [s.checksums for s in self._shards],
            [f.bytes_per_token for f in self.fields], num_threads, verify)

    def _buffer_pool(self, nbytes: int, pin_memory: bool, keep: int) -> _HostBuffers:
        """Batch buffers shared by this dataset's readers, so the next epoch's reader reuses
        memory the last one already faulted in."""
        key = (nbytes, pin_memory)
        if key not in self._host_buffers:
            self._host_buffers[key] = _HostBuffers(nbytes, pin_memory, keep)
        pool = self._host_buffers[key]
        pool.keep = max(pool.keep, keep)
        return pool

    def read_sample(self, i: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """Sample i as CPU tensors in the stored dtypes, checksum-verified."""
        self._check_index(i)
        n = int(self.sample_lengths[i])
        out = {f.name: torch.empty((n, *f.token_shape), dtype=f.torch_dtype) for f in self.fields}
        if self._native_single is None or self._native_single[0] != verify:
            self._native_single = (verify, self._native_reader(1, verify))
        native = self._native_single[1]
        dests = [out[f.name].view(torch.uint8).numpy() for f in self.fields]
        with _native_errors():
            native.wait(native.submit(np.array([i], dtype=np.int64), dests))
        return out

    def verify(self) -> None:
        """Re-hash every shard file end to end against the manifest (a full read)."""
        for entry, shard in zip(self.manifest["shards"], self._shards):
            size, checksum = _shardio.hash_file(str(shard.path))
            if size != entry["bytes"] or _hex(checksum) != entry["xxh64"]:
                raise ShardError(f"{shard.path}: file checksum mismatch (xxh64 {_hex(checksum)}, "
                                 f"{size} bytes; manifest says {entry['xxh64']}, "
                                 f"{entry['bytes']} bytes)")


# ----------------------------------------------------------------------------- reader

class _HostBuffers:
    """Flat host buffers, one per batch.

    Pinned: a fresh ``torch.empty(pin_memory=True)`` per batch; torch's caching host allocator
    makes that cheap and keeps a block from reuse until async copies out of it have finished.
    Pageable: fresh allocations this large page-fault at ~2 GB/s, so buffers are pooled and a
    buffer is reused only when no tensor of the batch it backed is alive any more (its refcount,
    which torch.from_numpy tensors and their views hold, is back to the pool's own).
    """

    def __init__(self, nbytes: int, pin_memory: bool, keep: int) -> None:
        self.nbytes, self.pin_memory, self.keep = nbytes, pin_memory, keep
        self._pool: list[np.ndarray] = []

    def get(self) -> torch.Tensor:
        if self.pin_memory:
            return torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        for k in range(len(self._pool)):
            # References: the pool list and getrefcount's argument. Anything more is a live batch.
            if sys.getrefcount(self._pool[k]) == 2:
                return torch.from_numpy(self._pool[k])
        arr = np.empty(self.nbytes, dtype=np.uint8)
        if len(self._pool) < self.keep:
            self._pool.append(arr)
        return torch.from_numpy(arr)


class ShardReader:
    """One epoch of ``dataset`` as packed, shuffled, verified batches.

    The epoch's order is ``permutation(len(dataset), seed, epoch)`` (C++, fixed definition),
    starting at position ``start``. Samples are packed greedily in that order into batches of at
    most ``token_budget`` tokens; no sample is split. A sample longer than the budget is an error
    at construction (it would otherwise break the memory bound the budget exists for).

    Each batch is a dict of CPU tensors: the per-token fields concatenated ([T, ...], stored
    dtypes), ``offsets`` (int64 [B+1], sample boundaries within the batch) and ``sample_ids``
    (int64 [B], dataset indices). ``num_threads`` C++ threads read up to ``prefetch`` batches
    ahead, without the GIL, into pinned memory if ``pin_memory`` (needs CUDA) and verify every
    sample's checksum if ``verify``.

    Resuming: :meth:`position` is the permutation index of the first sample not yet yielded;
    a reader built with the same dataset, token_budget, seed and epoch and ``start=position()``
    yields exactly the batches the first one would have yielded next.
    """

    def __init__(self, dataset: ShardDataset, token_budget: int, seed: int, epoch: int = 0,
                 start: int = 0, *, num_threads: int = 4, prefetch: int = 2,
                 pin_memory: bool = False, verify: bool = True) -> None:
        if not isinstance(dataset, ShardDataset):
            raise ValueError(f"dataset must be a ShardDataset, got {type(dataset).__name__}")
        for name, value, low in (("token_budget", token_budget, 1), ("seed", seed, 0),
                                 ("epoch", epoch, 0), ("start", start, 0),
                                 ("num_threads", num_threads, 1), ("prefetch", prefetch, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if seed >= 2**64 or epoch >= 2**64:
            raise ValueError("seed and epoch must be < 2**64")
        if start > len(dataset):
            raise ValueError(f"start={start} is past the end of the epoch ({len(dataset)} samples)")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (pinned host memory is for GPU copies); "
                             "pass pin_memory=torch.cuda.is_available()")
        self.dataset, self.token_budget = dataset, int(token_budget)
        self.seed, self.epoch, self.start = int(seed), int(epoch), int(start)
        self._order = _shardio.permutation(len(dataset), self.seed, self.epoch)
        lengths = dataset.sample_lengths[self._order]
        too_long = np.flatnonzero(dataset.sample_lengths > self.token_budget)
        if too_long.size:
            worst = int(too_long[np.argmax(dataset.sample_lengths[too_long])])
            file, local = dataset.locate(worst)
            raise ValueError(
                f"token_budget={self.token_budget} is smaller than {too_long.size} sample(s); the "
                f"longest is dataset sample {worst} ({file}, sample {local}) with "
                f"{int(dataset.sample_lengths[worst])} tokens. Raise token_budget or capture "
                f"shorter samples")
        self._lengths = lengths
        self._bounds = self.start + _shardio.pack_batches(lengths[self.start:], self.token_budget)
        if len(self._bounds) == 1:  # nothing left in this epoch
            self._bounds = np.array([self.start], dtype=np.int64)
        self._fields = dataset.fields
        self._slot_offsets = np.cumsum(
            [0] + [_round_up(self.token_budget * f.bytes_per_token) for f in self._fields])
        self._buffers = dataset._buffer_pool(int(self._slot_offsets[-1]), pin_memory,
                                             keep=prefetch + 2)
        self._pin = pin_memory
        self._prefetch = int(prefetch)
        self._native = dataset._native_reader(int(num_threads), verify)
        self._pending: deque[tuple[int, dict]] = deque()
        self._next_submit = 0
        self._next_yield = 0
        self._closed = False

    def __len__(self) -> int:
        """Batches in this reader's epoch, from its ``start``."""
        return len(self._bounds) - 1

    def position(self) -> int:
        """Permutation index of the first sample not yet yielded (resume with start=this)."""
        return int(self._bounds[self._next_yield])

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._closed:
            raise ValueError("ShardReader is closed")
        self._fill()
        if not self._pending:
            raise StopIteration
        ticket, batch = self._pending.popleft()
        self._fill()  # keep `prefetch` batches reading while the caller works on this one
        with _native_errors():
            self._native.wait(ticket)
        self._next_yield += 1
        return batch

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch and self._next_submit < len(self):
            self._pending.append(self._submit(self._next_submit))
            self._next_submit += 1

    def _submit(self, k: int) -> tuple[int, dict]:
        lo, hi = int(self._bounds[k]), int(self._bounds[k + 1])
        ids = self._order[lo:hi].copy()
        lens = self._lengths[lo:hi]
        total = int(lens.sum())
        flat = self._buffers.get()
        flat_np = flat.numpy()
        batch: dict[str, torch.Tensor] = {}
        dests = []
        for f, off in zip(self._fields, self._slot_offsets):
            nbytes = total * f.bytes_per_token
            dests.append(flat_np[off:off + nbytes])
            batch[f.name] = flat[off:off + nbytes].view(f.torch_dtype).view(total, *f.token_shape)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        batch["offsets"] = torch.from_numpy(offsets)
        batch["sample_ids"] = torch.from_numpy(ids)
        if self._pin:
            batch["offsets"] = batch["offsets"].pin_memory()
            batch["sample_ids"] = batch["sample_ids"].pin_memory()
        ticket = self._native.submit(ids, dests)
        return ticket, batch

    def close(self) -> None:
        """Stop the threads and drop batches read ahead. Idempotent."""
        if not self._closed:
            self._closed = True
            self._native.close()
            self._pending.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
