"""Give freed memory back to the OS (glibc), for CPU runs where memory is the limit.

After each large free, glibc raises its mmap threshold (up to 32 MiB), so later tensors of a few
MiB come from the heap, whose freed pages mostly stay in the process. A training step allocates and
frees many such tensors: at 8,192 tokens that retention was 0.4–0.6 GiB of a 2.2 GiB peak RSS. A
fixed threshold sends every block above it to mmap, unmapped on free, at the cost of page faults
(fresh pages) on each new block: worth it only where memory, not time, is the limit."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = 128 << 10) -> bool:
    """Blocks above `threshold` bytes are mmapped and given back when freed, and the heap is trimmed
    above it. Returns False where this is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # absent on musl
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold) == 1) & bool(
        mallopt(M_TRIM_THRESHOLD, threshold) == 1
    )
