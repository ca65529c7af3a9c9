"""ShardWriter: samples in, crash-safe and resumable shards out."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from specfast import _shardio
from specfast.fileio import fsync_dir
from specfast.shards.format import (
    DEFAULT_SHARD_BYTES,
    FLOAT_CODES,
    INDEX_DTYPES,
    MANIFEST,
    SHARD_NAME,
    Field,
    ShardError,
    capture_diff,
    hex64,
    load_manifest,
    make_fields,
    new_manifest,
    normalize_capture,
    shard_file,
    shard_name,
    write_manifest,
)

logger = logging.getLogger(__name__)


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

    def __init__(
        self,
        out_dir: str | os.PathLike,
        capture_config: Mapping[str, Any],
        *,
        shard_tokens: int | None = None,
        dtype: str | None = None,
        index_dtype: str | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        if shard_tokens is not None and (not isinstance(shard_tokens, int) or shard_tokens < 1):
            raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        if index_dtype is not None and index_dtype not in INDEX_DTYPES:
            raise ValueError(
                f"index_dtype must be one of {sorted(INDEX_DTYPES)}, got {index_dtype!r}"
            )
        capture = normalize_capture(capture_config, "ShardWriter", dtype)
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
            raise ShardError(
                f"{self.out_dir} is being written by another ShardWriter (its .lock is held)"
            ) from None
        return fd

    def _open(self, capture: dict, shard_tokens: int | None, index_dtype: str | None) -> None:
        if (self.out_dir / MANIFEST).exists():
            m = load_manifest(self.out_dir)
            diffs = capture_diff(m["capture"], capture)
            if diffs:
                raise ShardError(
                    f"{self.out_dir / MANIFEST} was captured with a different config "
                    f"(" + "; ".join(diffs) + "); write to a new directory"
                )
            stored_index = m["layout"]["index_dtype"]
            if index_dtype is not None and index_dtype != stored_index:
                raise ShardError(
                    f"{self.out_dir / MANIFEST} stores index_dtype {stored_index!r}, "
                    f"got {index_dtype!r}"
                )
            for entry in m["shards"]:
                path = self.out_dir / entry["file"]
                size = path.stat().st_size if path.exists() else None
                if size != entry["bytes"]:
                    state = "is missing" if size is None else f"has {size} bytes"
                    raise ShardError(
                        f"cannot resume: {path} {state}, manifest says {entry['bytes']} bytes"
                    )
            self._manifest = m
            self.shard_tokens = shard_tokens or m["layout"].get("shard_tokens")
            if m["shards"]:
                logger.info(
                    "resuming %s after %d shards, %d samples",
                    self.out_dir,
                    len(m["shards"]),
                    m["totals"]["samples"],
                )
        else:
            self._manifest = new_manifest(capture, index_dtype, shard_tokens)
            self.shard_tokens = shard_tokens
        self._remove_leftovers()
        self._manifest["complete"] = False
        write_manifest(self.out_dir, self._manifest)
        fields = self._manifest["layout"]["fields"]
        self._fields = (
            None
            if fields is None
            else make_fields(capture, self._manifest["layout"]["index_dtype"], fields)
        )

    def _remove_leftovers(self) -> None:
        """Delete temp files and unlisted shards of a killed run (never anything else)."""
        listed = {s["file"] for s in self._manifest["shards"]}
        for p in sorted(self.out_dir.iterdir()):
            stray_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            unlisted = SHARD_NAME.match(p.name) is not None and p.name not in listed
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
        ``final_hidden`` [n, H], optionally ``target_argmax`` [n] and ``positions`` [n] (the
        draft's RoPE positions of an mRoPE target); numpy arrays or torch tensors
        (any device). Hidden states are cast to the stored dtype."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        self._poll()
        index = self.num_samples_done + len(self._pending) + self._inflight_samples()
        where = f"ShardWriter.add (sample {index})"
        if not isinstance(sample, Mapping):
            raise ValueError(
                f"{where}: sample must be a dict of tensors, got {type(sample).__name__}"
            )
        if self._fields is None:  # the first sample decides the optional fields stored
            self._fields = make_fields(
                self._manifest["capture"], self._manifest["layout"]["index_dtype"], sample
            )
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
            raise ValueError(
                f"{where}: sample keys must be {sorted(names)} "
                f"(missing {missing}, unexpected {extra})"
            )
        ids = _as_tensor(sample["input_ids"], f"{where}: input_ids")
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(
                f"{where}: input_ids must have shape [n] with n >= 1, got {list(ids.shape)}"
            )
        n = ids.numel()
        out = {}
        for f in self._fields:
            t = ids if f.name == "input_ids" else _as_tensor(sample[f.name], f"{where}: {f.name}")
            shape = [n, *f.token_shape]
            if list(t.shape) != shape:
                raise ValueError(f"{where}: {f.name} has shape {list(t.shape)}, expected {shape}")
            t = _check_values(t, f, f"{where}: {f.name}")
            t = t.to(
                device="cpu", dtype=f.torch_dtype, memory_format=torch.contiguous_format, copy=True
            )
            raw = t.view(torch.uint8).numpy().reshape(-1)
            if f.st_dtype in FLOAT_CODES:  # checked after the cast: it can overflow
                bad = _shardio.first_nonfinite(raw, f.st_dtype)
                if bad >= 0:
                    raise ValueError(
                        f"{where}: {f.name} holds NaN or inf at token "
                        f"{bad // t[0].numel()} (after casting to {f.st_dtype})"
                    )
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
        header, parts = shard_file(blocks, offsets, checksums, self._manifest["capture"])
        entry = {
            "file": shard_name(index),
            "samples": len(lengths),
            "tokens": int(offsets[-1]),
            "bytes": 0,
            "xxh64": "",
            "header_xxh64": hex64(_shardio.xxh64(header)),
            "index_xxh64": hex64(_shardio.xxh64_parts([offsets, checksums])),
        }
        self._native.start(str(self.out_dir / entry["file"]), parts)
        self._inflight = (entry, parts)  # parts stay referenced until the write is done
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
        entry["bytes"], entry["xxh64"] = size, hex64(checksum)
        m = self._manifest
        m["shards"].append(entry)
        t = m["totals"]
        t["shards"] += 1
        t["samples"] += entry["samples"]
        t["tokens"] += entry["tokens"]
        t["bytes"] += size
        write_manifest(self.out_dir, m)

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
            write_manifest(self.out_dir, self._manifest)
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


def _check_values(t: torch.Tensor, f: Field, where: str) -> torch.Tensor:
    """Reject values the stored dtype would silently corrupt."""
    if f.st_dtype in FLOAT_CODES:
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
        lo = -1 if f.name == "target_argmax" else 0  # -1: argmax not computed for that row
        if bool((t < lo).any()) or bool((t > hi).any()):
            raise ValueError(
                f"{where}: token ids must lie in [{lo}, {hi}] (got {int(t.min())}..{int(t.max())})"
            )
    return t


def merge_captures(parts: list[Path], out_dir: str | os.PathLike) -> dict:
    """One dataset in ``out_dir`` from complete captures written side by side (one per rank of a
    distributed capture), in the given order: their shards are hard-linked into ``out_dir`` under
    consecutive names, then one manifest listing them all is written atomically — the commit
    point. Rerunning it after a crash redoes it; the parts are left for the caller to remove."""
    out_dir = Path(out_dir)
    manifests = [load_manifest(Path(p)) for p in parts]
    for p, m in zip(parts, manifests):
        if not m["complete"]:
            raise ShardError(f"{Path(p) / MANIFEST}: this part of the capture has not finished")
        diffs = capture_diff(manifests[0]["capture"], m["capture"])
        if diffs:
            raise ShardError(f"{Path(p) / MANIFEST}: captured differently ({'; '.join(diffs)})")
    first = manifests[0]
    merged = new_manifest(
        first["capture"], first["layout"]["index_dtype"], first["layout"]["shard_tokens"]
    )
    fields = [m["layout"]["fields"] for m in manifests if m["layout"]["fields"] is not None]
    if any(f != fields[0] for f in fields):
        raise ShardError(f"{out_dir}: the parts store different fields: {fields}")
    merged["layout"]["fields"] = fields[0] if fields else None
    totals = merged["totals"]
    for p, m in zip(parts, manifests):
        for entry in m["shards"]:
            name = shard_name(len(merged["shards"]))
            src, dst = Path(p) / entry["file"], out_dir / name
            if not (dst.exists() and os.path.samefile(src, dst)):
                dst.unlink(missing_ok=True)
                os.link(src, dst)
            merged["shards"].append({**entry, "file": name})
            totals["shards"] += 1
            for k in ("samples", "tokens", "bytes"):
                totals[k] += entry[k]
    merged["complete"] = True
    fsync_dir(out_dir)
    write_manifest(out_dir, merged)
    return merged
