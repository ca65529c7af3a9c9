"""How glibc's malloc treats freed memory on CPU runs: give it back where memory is the limit, keep
it where time is.

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
M_MMAP_MAX = -4
MMAP_MAX_DEFAULT = 65536  # glibc's default count of mmapped blocks


def return_freed_memory(threshold: int = 128 << 10) -> bool:
    """Blocks above `threshold` bytes are mmapped and given back when freed, and the heap is trimmed
    above it. Returns False where this is not glibc (nothing changed)."""
    return _mallopt(
        (M_MMAP_MAX, MMAP_MAX_DEFAULT), (M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, threshold)
    )


def keep_freed_memory() -> bool:
    """Every block comes from the heap and freed pages stay in the process, for the next step to
    reuse. glibc mmaps blocks above 32 MiB whatever its threshold, and a training step allocates
    and frees dozens of them (the [V_draft, H] gradient of each TTT step's head is 36 MiB at
    16,384 × 576): each then costs fresh zeroed pages, ~3% of a CPU step at 512-token rows. With
    the heap alone, peak RSS measured lower, not higher (the steps' same-sized blocks reuse the
    same pages). Returns False where this is not glibc (nothing changed)."""
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))


def _mallopt(*settings: tuple[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # absent on musl
    if mallopt is None:
        return False
    return all([mallopt(param, value) == 1 for param, value in settings])
