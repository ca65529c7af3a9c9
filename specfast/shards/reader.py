"""ShardReader: reads the batches it is given, ahead of the caller, on C++ threads, into
(optionally pinned) host buffers. Which samples go into which batch is the batch plan's business
(:mod:`specfast.data.plan`), not the reader's."""

from __future__ import annotations

import sys
import weakref
from collections import deque
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from specfast.shards.dataset import ShardDataset
from specfast.shards.format import native_errors, round_up


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


# Pools per dataset, shared by its readers, so a later reader (another epoch, a resumed run)
# reuses memory an earlier one already faulted in. Weak: a pool lives as long as its dataset.
_POOLS: weakref.WeakKeyDictionary[ShardDataset, dict[tuple[int, bool], _HostBuffers]] = (
    weakref.WeakKeyDictionary()
)


def _buffer_pool(dataset: ShardDataset, nbytes: int, pin_memory: bool, keep: int) -> _HostBuffers:
    pools = _POOLS.setdefault(dataset, {})
    pool = pools.setdefault((nbytes, pin_memory), _HostBuffers(nbytes, pin_memory, keep))
    pool.keep = max(pool.keep, keep)
    return pool


def _check_fits(dataset: ShardDataset, batch_tokens: int) -> None:
    """Refuse a dataset with a sample longer than the budget: the buffers could not hold it, and
    the memory bound the budget exists for would break."""
    lengths = dataset.sample_lengths
    too_long = np.flatnonzero(lengths > batch_tokens)
    if too_long.size:
        worst = int(too_long[np.argmax(lengths[too_long])])
        file, local = dataset.locate(worst)
        raise ValueError(
            f"batch_tokens={batch_tokens} is smaller than {too_long.size} sample(s); the "
            f"longest is dataset sample {worst} ({file}, sample {local}) with "
            f"{int(lengths[worst])} tokens. Raise batch_tokens or capture shorter samples"
        )


class ShardReader:
    """Reads ``batches`` (an iterable of int64 arrays of dataset sample indices, such as
    ``BatchPlan.upcoming()``, possibly endless) out of ``dataset``, in the given order.

    Each batch is a dict of CPU tensors: the per-token fields of its samples concatenated in
    order ([T, ...], stored dtypes), ``offsets`` (int64 [B+1], sample boundaries within the batch)
    and ``sample_ids`` (int64 [B], the indices given). ``num_threads`` C++ threads read up to
    ``prefetch`` batches ahead of the one the caller holds, without the GIL, into pinned memory
    if ``pin_memory`` (needs CUDA), and verify every sample's checksum if ``verify``.

    ``batches`` is pulled lazily, only as far as the prefetch reaches: after the caller has taken
    k batches, k + ``prefetch`` have been pulled. Iteration ends when ``batches`` does.

    ``batch_tokens`` sizes the buffers: a dataset sample longer than it is a ValueError here, and
    a batch of more tokens than it is a ValueError when that batch's turn comes (as is any error
    raised while pulling it), after every batch before it has been yielded.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        batches: Iterable[np.ndarray],
        batch_tokens: int,
        *,
        num_threads: int = 4,
        prefetch: int = 2,
        pin_memory: bool = False,
        verify: bool = True,
    ) -> None:
        if not isinstance(dataset, ShardDataset):
            raise ValueError(f"dataset must be a ShardDataset, got {type(dataset).__name__}")
        for name, value, low in (
            ("batch_tokens", batch_tokens, 1),
            ("num_threads", num_threads, 1),
            ("prefetch", prefetch, 1),
        ):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError(
                "pin_memory=True needs CUDA (pinned host memory is for GPU copies); "
                "pass pin_memory=torch.cuda.is_available()"
            )
        self.dataset, self.batch_tokens = dataset, int(batch_tokens)
        _check_fits(dataset, self.batch_tokens)
        self._batches: Iterator[np.ndarray] | None = iter(batches)
        self._fields = dataset.fields
        # Each field gets a 4 KiB-aligned slot of batch_tokens tokens in one flat buffer.
        self._slot_offsets = np.cumsum(
            [0] + [round_up(self.batch_tokens * f.bytes_per_token) for f in self._fields]
        )
        # prefetch in flight + the batch the caller holds + the one it may still be finishing
        self._buffers = _buffer_pool(
            dataset, int(self._slot_offsets[-1]), pin_memory, keep=prefetch + 2
        )
        self._pin = pin_memory
        self._prefetch = int(prefetch)
        self._native = dataset.native_reader(int(num_threads), verify)
        # (ticket, batch), or (None, exception) for a batch that could not be submitted
        self._pending: deque[tuple[int | None, Any]] = deque()
        self._pulled = 0
        self._closed = False

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._closed:
            raise ValueError("ShardReader is closed")
        self._fill()
        if not self._pending:
            raise StopIteration
        ticket, batch = self._pending.popleft()
        if ticket is None:
            raise batch
        self._fill()  # keep `prefetch` batches reading while the caller works on this one
        with native_errors():
            self._native.wait(ticket)
        return batch

    def _fill(self) -> None:
        while len(self._pending) < self._prefetch and self._batches is not None:
            k = self._pulled
            try:
                ids = next(self._batches)
                self._pulled += 1
                self._pending.append(self._submit(ids, k))
            except StopIteration:
                self._batches = None
            except Exception as e:  # deferred, so what comes before it is still yielded
                self._pending.append((None, e))
                self._batches = None

    def _submit(self, ids: Any, k: int) -> tuple[int, dict]:
        a = np.asarray(ids)
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(
                f"batch {k} must be a non-empty 1-D integer array of sample "
                f"indices, got {a.dtype} {list(a.shape)}"
            )
        n = len(self.dataset)
        if int(a.min()) < 0 or int(a.max()) >= n:
            bad = int(a[(a < 0) | (a >= n)][0])
            raise IndexError(f"batch {k}: sample index {bad} out of range [0, {n})")
        ids = a.astype(np.int64)  # a copy: the batch's sample_ids must not alias the caller's
        lens = self.dataset.sample_lengths[ids]
        total = int(lens.sum())
        if total > self.batch_tokens:
            raise ValueError(
                f"batch {k} holds {total} tokens in {len(ids)} samples, more than "
                f"batch_tokens={self.batch_tokens}"
            )
        flat = self._buffers.get()
        flat_np = flat.numpy()
        batch: dict[str, torch.Tensor] = {}
        dests = []
        for f, off in zip(self._fields, self._slot_offsets):
            nbytes = total * f.bytes_per_token
            dests.append(flat_np[off : off + nbytes])
            batch[f.name] = flat[off : off + nbytes].view(f.torch_dtype).view(total, *f.token_shape)
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
        """Stop the threads, drop batches read ahead, pull nothing more. Idempotent."""
        if not self._closed:
            self._closed = True
            self._native.close()
            self._pending.clear()
            self._batches = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
