"""Does `torch.compile` make the draft's training step faster on CPU?

One offline TTT training step (forward and backward, TTT 7, draft vocabulary 16,384, SmolLM2-sized
draft, fp32, one thread) three ways, in one process, interleaved:

- specfast: the layer as shipped (hand-written fused torch paths of kernels/: rms_norm, rope,
  swiglu, add_rms_norm; the same whichever way the step is run);
- compiled: the layer's two halves (`pre`: norms, q/k/v, RoPE; `post`: o_proj, add+norm, MLP)
  written with the kernels' plain-PyTorch references and compiled by inductor (C++ backend);
- reference: the same reference halves, eager.

The attention, the fused head + loss and the unroll are the same code in all three: only what a
compiler could fuse (the per-step elementwise chain around the matmuls) differs. Time is the CPU
time of this one-thread process (`time.process_time`), the least of --repeats runs, so other work
on the machine costs little. Compile time is reported apart.

    python bench/draft_step_compile.py [--rows 512,2048] [--repeats 4]
"""

from __future__ import annotations

import argparse
import sys
import time

import harness
import torch

TTT = 7


def make_draft():
    from specfast.model import DraftConfig, Eagle3Draft

    cfg = DraftConfig(
        hidden_size=576, target_hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, intermediate_size=1536, vocab_size=49152, draft_vocab_size=16384,
        aux_layer_ids=[1, 14, 26], rope_theta=100000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.set_vocab(torch.randperm(cfg.vocab_size)[: cfg.draft_vocab_size].sort().values)
    draft.attach_target(torch.randn(cfg.vocab_size, cfg.hidden_size))
    return draft


def make_batch(T: int):
    from specfast.ttt import PackedBatch

    return PackedBatch(
        input_ids=torch.randint(0, 49152, (T,)),
        doc_ids=torch.zeros(T, dtype=torch.long),
        positions=torch.arange(T),
        loss_mask=torch.rand(T) < 0.75,  # about ShareGPT's share of assistant tokens
        aux_hidden=torch.randn(T, 3 * 576),
        target_in_vocab=torch.rand(T) < 0.93,
        teacher_hidden=torch.randn(T, 576),
        teacher_weight=torch.randn(16384, 576) * 0.05,
    )


def reference_halves(layer, rotary):
    """The layer's `pre` and `post` in the kernels' plain-PyTorch references."""
    from specfast.kernels.rms_norm import add_rms_norm_reference, rms_norm_reference
    from specfast.kernels.rope import rope_reference
    from specfast.kernels.swiglu import swiglu_reference

    attn, mlp = layer.self_attn, layer.mlp

    def pre(emb, h, positions, _rotary):
        hn = rms_norm_reference(h, layer.hidden_norm.weight, layer.hidden_norm.eps)
        e = rms_norm_reference(emb, layer.input_layernorm.weight, layer.input_layernorm.eps)
        x = torch.cat([e, hn], dim=-1)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, attn.nh, attn.hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, attn.nkv, attn.hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, attn.nkv, attn.hd).transpose(1, 2)
        inv, scale = rotary.inv_freq, rotary.attention_scaling
        return (
            rope_reference(q, positions, inv, scale),
            rope_reference(k, positions, inv, scale),
            v,
            h,
        )

    def post(a, residual):
        B, _, T, _ = a.shape
        o = attn.o_proj(a.transpose(1, 2).reshape(B, T, -1))
        norm = layer.post_attention_layernorm
        h, y = add_rms_norm_reference(residual, o, norm.weight, norm.eps)
        return h + mlp.down_proj(swiglu_reference(mlp.gate_proj(y), mlp.up_proj(y)))

    return pre, post


def measure_row(T: int, repeats: int) -> dict:
    from specfast.ttt import ttt_unroll

    draft, batch = make_draft(), make_batch(T)
    layer = draft.midlayer
    pre, post = reference_halves(layer, draft.rotary)
    ways = {
        "specfast": (layer.pre, layer.post),
        "compiled": (torch.compile(pre, dynamic=False), torch.compile(post, dynamic=False)),
        "reference": (pre, post),
    }

    def step(way):
        layer.pre, layer.post = ways[way]
        t0 = time.process_time()
        res = ttt_unroll(draft, batch, TTT)
        res.loss.backward()
        draft.zero_grad(set_to_none=True)
        return time.process_time() - t0, float(res.loss.detach())

    t0 = time.perf_counter()
    step("compiled")  # compiles (every step's row count is a shape of its own)
    compile_s = time.perf_counter() - t0
    times = {w: [] for w in ways}
    losses = {}
    for _ in range(repeats):
        for way in ways:
            dt, losses[way] = step(way)
            times[way].append(dt)
    best = {w: min(t) for w, t in times.items()}
    drift = max(abs(losses[w] - losses["specfast"]) for w in ways)
    return {"T": T, "best": best, "compile_s": compile_s, "drift": drift}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="512,2048", help="row lengths in tokens")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    harness.isolate(1)
    results = []
    for T in (int(x) for x in args.rows.split(",")):
        r = measure_row(T, args.repeats)
        print(f"T={T}: {r}", flush=True)
        results.append(r)
    rows = []
    for r in results:
        b = r["best"]
        rows.append((f"{r['T']} tokens: specfast vs compiled", b["specfast"], b["compiled"]))
        rows.append(
            (f"{r['T']} tokens: specfast vs eager reference", b["specfast"], b["reference"])
        )
    body = [
        "CPU seconds of one training step (forward + backward, TTT 7), least of "
        f"{args.repeats}; ratio = other / specfast (above 1: the shipped layer is faster).",
        "",
        *harness.comparison(rows, ours="specfast", baseline="other", unit="CPU s"),
        "",
        "Compile time of the first step (wall): "
        + ", ".join(f"{r['T']} tokens {r['compile_s']:.0f} s" for r in results)
        + ". Largest loss difference between the three: "
        + f"{max(r['drift'] for r in results):.2e}.",
    ]
    harness.write_result(
        "draft_step_compile",
        "# torch.compile of the draft step (CPU)",
        body,
        save=not args.no_save,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
