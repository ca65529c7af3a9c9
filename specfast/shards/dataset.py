"""ShardDataset: a shard directory, opened, checked against the caller's expectations, and read
one sample at a time."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from specfast import _shardio
from specfast.shards.format import (
    ALIGN,
    MANIFEST,
    MAX_HEADER,
    SHARD_FORMAT,
    ST_ITEMSIZE,
    VERSION,
    Field,
    ShardError,
    capture_diff,
    hex64,
    load_manifest,
    make_fields,
    native_errors,
)


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

    Samples are numbered across the shards in manifest order; ``sample_lengths[i]`` is sample
    i's token count (what :class:`specfast.data.plan.BatchPlan` packs by).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        expect: Mapping[str, Any] | None = None,
        *,
        allow_incomplete: bool = False,
    ) -> None:
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        manifest_path = self.path / MANIFEST
        if expect is not None:
            if not isinstance(expect, Mapping):
                raise ValueError(f"expect must be a dict, got {type(expect).__name__}")
            diffs = capture_diff(self.manifest["capture"], expect)
            if diffs:
                raise ShardError(
                    f"{manifest_path} does not match what is expected: " + "; ".join(diffs)
                )
        if not self.manifest["complete"] and not allow_incomplete:
            raise ShardError(
                f"{manifest_path}: the capture has not finished (complete: false); "
                f"resume it, or pass allow_incomplete=True to read the "
                f"{len(self.manifest['shards'])} shards written so far"
            )
        layout = self.manifest["layout"]
        fields = layout["fields"] or {}
        self.fields: list[Field] = (
            make_fields(self.manifest["capture"], layout["index_dtype"], fields) if fields else []
        )
        self._shards = [self._open_shard(e) for e in self.manifest["shards"]]
        lengths = [np.diff(s.token_offsets) for s in self._shards]
        self.sample_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self._sample_base = np.cumsum([0] + [len(s.checksums) for s in self._shards])
        self._native_single: tuple[bool, Any] | None = None  # (verify, reader) for read_sample

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

    def lengths(self) -> np.ndarray:
        """Token count of every sample (the plan's :class:`SampleSource` protocol)."""
        return self.sample_lengths

    def locate(self, i: int) -> tuple[str, int]:
        """(shard file, index within it) of dataset sample i."""
        self._check_index(i)
        s = int(np.searchsorted(self._sample_base, i, side="right")) - 1
        return self._shards[s].path.name, i - int(self._sample_base[s])

    # -- opening

    def _open_shard(self, entry: dict) -> _Shard:
        path = self.path / entry["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(
                f"missing shard: {path} is listed in {self.path / MANIFEST} but does not exist"
            ) from None
        if size != entry["bytes"]:
            state = "truncated" if size < entry["bytes"] else "longer than recorded"
            raise ShardError(f"{path} is {state}: {size} bytes, the manifest says {entry['bytes']}")
        with open(path, "rb") as f:
            fd = f.fileno()
            prefix = os.pread(fd, 8, 0)
            if len(prefix) < 8:
                raise ShardError(f"{path}: damaged header: the file is only {size} bytes")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > min(size - 8, MAX_HEADER):
                raise ShardError(
                    f"{path}: damaged header: header length {hlen} does not fit "
                    f"in a {size}-byte file"
                )
            region = prefix + os.pread(fd, hlen, 8)
            if hex64(_shardio.xxh64(region)) != entry["header_xxh64"]:
                raise ShardError(
                    f"{path}: damaged header: header checksum mismatch "
                    f"(manifest says {entry['header_xxh64']})"
                )
            try:
                header = json.loads(region[8:])
                offsets_at, checksums_at, field_offsets = self._check_header(
                    header, entry, hlen, size
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ShardError(f"{path}: damaged header: {e}") from None
            s = entry["samples"]
            off_bytes = os.pread(fd, 8 * (s + 1), offsets_at)
            sum_bytes = os.pread(fd, 8 * s, checksums_at)
        if hex64(_shardio.xxh64_parts([off_bytes, sum_bytes])) != entry["index_xxh64"]:
            raise ShardError(
                f"{path}: damaged index: the offsets / sample_checksum tensors do not "
                f"match their checksum (manifest says {entry['index_xxh64']})"
            )
        token_offsets = np.frombuffer(off_bytes, dtype="<i8").astype(np.int64)
        if (
            token_offsets[0] != 0
            or token_offsets[-1] != entry["tokens"]
            or bool((np.diff(token_offsets) <= 0).any())
        ):
            raise ShardError(f"{path}: offsets are not increasing from 0 to {entry['tokens']}")
        checksums = np.frombuffer(sum_bytes, dtype="<u8").astype(np.uint64)
        return _Shard(path, field_offsets, token_offsets, checksums)

    def _check_header(
        self, header: dict, entry: dict, hlen: int, size: int
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
            nbytes = ST_ITEMSIZE[st_dtype] * int(np.prod(shape, dtype=np.int64))
            if t["dtype"] != st_dtype or t["shape"] != shape or end - begin != nbytes:
                raise ValueError(
                    f"tensor {name!r} is {t['dtype']} {t['shape']}, expected {st_dtype} {shape}"
                )
            if begin % ALIGN or data_start + end > size:
                raise ValueError(
                    f"tensor {name!r} at data bytes [{begin}, {end}) is misaligned "
                    f"or past the end of the file"
                )
            starts[name] = data_start + begin
        return (starts["offsets"], starts["sample_checksum"], [starts[f.name] for f in self.fields])

    def _check_index(self, i: int) -> None:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
            raise IndexError(f"sample index {i!r} out of range [0, {len(self)})")

    # -- reading

    def native_reader(self, num_threads: int = 1, verify: bool = True) -> Any:
        """A C++ reader (``_shardio.Reader``) over this dataset's shards: ``submit(ids, dests)``
        queues samples to be packed, in order, into one destination buffer per field (bytes
        back to back, ``self.fields`` order) and returns a ticket; ``wait(ticket)`` blocks
        without the GIL until they are in place (a failure raises ``_shardio.ShardIOError``
        naming file and sample); ``close()`` joins the threads."""
        return _shardio.Reader(
            [str(s.path) for s in self._shards],
            [s.field_offsets for s in self._shards],
            [s.token_offsets for s in self._shards],
            [s.checksums for s in self._shards],
            [f.bytes_per_token for f in self.fields],
            num_threads,
            verify,
        )

    def read_sample(self, i: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """Sample i as CPU tensors in the stored dtypes, checksum-verified."""
        self._check_index(i)
        n = int(self.sample_lengths[i])
        out = {f.name: torch.empty((n, *f.token_shape), dtype=f.torch_dtype) for f in self.fields}
        if self._native_single is None or self._native_single[0] != verify:
            self._native_single = (verify, self.native_reader(1, verify))
        native = self._native_single[1]
        dests = [out[f.name].view(torch.uint8).numpy() for f in self.fields]
        with native_errors():
            native.wait(native.submit(np.array([i], dtype=np.int64), dests))
        return out

    def verify(self) -> None:
        """Re-hash every shard file end to end against the manifest (a full read)."""
        for entry, shard in zip(self.manifest["shards"], self._shards):
            size, checksum = _shardio.hash_file(str(shard.path))
            if size != entry["bytes"] or hex64(checksum) != entry["xxh64"]:
                raise ShardError(
                    f"{shard.path}: file checksum mismatch (xxh64 {hex64(checksum)}, "
                    f"{size} bytes; manifest says {entry['xxh64']}, "
                    f"{entry['bytes']} bytes)"
                )
