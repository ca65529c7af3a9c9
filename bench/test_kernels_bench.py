"""Kernel microbenchmarks (pytest-benchmark), CPU paths, forward + backward, ours beside the
baseline in one group per shape. Collected only by ``pytest bench`` (``make bench``); conftest.py
pins the process to one core with one thread and writes the ratio table.

Baselines are the ones the bench scripts define: the materialised reference for
pruned_vocab_loss (fp32 [T, V] logits kept for backward), and the peers' dense fp32
[B, Hq, L, L+S-1] scores for ttt_attention (``dense_peer`` in ttt_attention.py). One more
pruned_vocab_loss group puts its kept-logits path (every chunk's grad_logits kept from the
forward, 6·T·H·V FLOPs) beside its own recompute path (keep_bytes=0, 8·T·H·V FLOPs) as the
baseline.
"""

import pytest
import torch
from pruned_vocab_loss import fwd_bwd
from pruned_vocab_loss import make_inputs as vocab_inputs
from specfast.kernels import pruned_vocab_loss, pruned_vocab_loss_reference, ttt_attention
from ttt_attention import HEADS, dense_peer
from ttt_attention import make_inputs as attention_inputs

ROUNDS = 5  # a few seconds per shape; the min over rounds is what the table compares

VOCAB = {
    "ours": lambda h, w, t, m: pruned_vocab_loss(h, w, t, m, backend="torch"),
    "baseline": pruned_vocab_loss_reference,
}
# ours with every chunk kept, against ours recomputing every chunk in the backward
KEPT = {
    "ours": lambda h, w, t, m: pruned_vocab_loss(h, w, t, m, backend="torch", keep_bytes=1 << 62),
    "baseline": lambda h, w, t, m: pruned_vocab_loss(h, w, t, m, backend="torch", keep_bytes=0),
}
ATTENTION = {"ours": lambda *a: ttt_attention(*a, backend="torch"), "baseline": dense_peer}


def _run(benchmark, group, impl, step, check):
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    check()
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)


# T = 4096 at V = 8192 takes two 64 MiB logits chunks, so the chunk loop is timed too; both
# shapes fit the default keep budget (128 MiB), so ours keeps every chunk here.
@pytest.mark.parametrize("impl", ["ours", "baseline"])
@pytest.mark.parametrize("T,H,V", [(1024, 576, 8192), (4096, 576, 8192)])
def test_pruned_vocab_loss(benchmark, impl, T, H, V):
    inputs = vocab_inputs(T, H, V, "cpu", torch.float32)

    def check():
        loss, _ = VOCAB[impl](*inputs)
        ref, _ = pruned_vocab_loss_reference(*inputs)
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)

    _run(
        benchmark,
        f"pruned_vocab_loss T={T} H={H} V={V}",
        impl,
        lambda: fwd_bwd(VOCAB[impl], *inputs),
        check,
    )


@pytest.mark.parametrize("impl", ["ours", "baseline"])
def test_pruned_vocab_loss_kept_vs_recompute(benchmark, impl):
    T, H, V = 4096, 576, 8192
    inputs = vocab_inputs(T, H, V, "cpu", torch.float32)

    def check():
        loss, _ = KEPT[impl](*inputs)
        ref, _ = pruned_vocab_loss_reference(*inputs)
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)

    _run(
        benchmark,
        f"pruned_vocab_loss kept (ours) vs recompute (baseline) T={T} H={H} V={V}",
        impl,
        lambda: fwd_bwd(KEPT[impl], *inputs),
        check,
    )


@pytest.mark.parametrize("impl", ["ours", "baseline"])
@pytest.mark.parametrize("L,doc_len", [(1024, None), (2048, 512)])
def test_ttt_attention(benchmark, impl, L, doc_len):
    q, keys, values, doc_ids = attention_inputs(L, HEADS["smollm2"], doc_len, "cpu", torch.float32)
    fn = ATTENTION[impl]

    def check():
        with torch.no_grad():
            torch.testing.assert_close(
                fn(q, keys, values, doc_ids),
                ttt_attention(q, keys, values, doc_ids, backend="reference"),
                rtol=1e-4,
                atol=1e-4,
            )

    def step():
        out = fn(q, keys, values, doc_ids)
        return torch.autograd.grad(out, (q, keys, values), torch.ones_like(out))

    docs = "1 doc" if doc_len is None else f"{doc_len}-token docs"
    _run(benchmark, f"ttt_attention L={L} {docs}", impl, step, check)
