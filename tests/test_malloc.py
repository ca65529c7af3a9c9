"""return_freed_memory: after it, memory freed by tensors of a few MiB leaves the process.
keep_freed_memory: after it, a freed 64 MiB block's pages stay and the next one reuses them."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import os, sys, torch
    from specfast.malloc import keep_freed_memory, return_freed_memory
    if sys.argv[1] == "on":
        assert keep_freed_memory()  # undone by what follows: the last call decides
        assert return_freed_memory()
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    big = torch.ones(1 << 21)  # 8 MiB freed at once: glibc then raises its mmap threshold
    del big
    # 64 blocks of 4 MiB, each followed by a small block that stays: on the heap, the pages of
    # the big ones could only be given back by trimming its top, which the small ones pin
    blocks, pins = [], []
    for _ in range(64):
        blocks.append(torch.ones(1 << 20))
        pins.append(torch.ones(1 << 8))
    before = rss()
    del blocks
    print((before - rss()) / 2**20)
    """
)


def probe(script: str, mode: str) -> float:
    """The number a probe prints, run in a fresh process (mallopt settings are process-wide)."""
    out = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_freed_tensors_leave_the_process():
    assert probe(PROBE, "on") > 200  # the 256 MiB of blocks are given back
    assert probe(PROBE, "off") < 100  # glibc's default keeps them: the call is what made the change


REUSE_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from specfast.malloc import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def cycles(n):  # 64 MiB blocks: above any mmap threshold glibc picks by itself
        for _ in range(n):
            x = torch.ones(16 << 20)
            del x
    cycles(16)  # the heap grows until freed blocks can serve the next ones
    before = faults()
    cycles(4)
    print((faults() - before) / (4 * (64 << 20) // 4096))  # share of the blocks' pages faulted in
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_kept_memory_is_reused_without_fresh_pages():
    assert probe(REUSE_PROBE, "keep") < 0.1
    assert probe(REUSE_PROBE, "default") > 0.5  # mmapped afresh (huge pages would fault fewer)
