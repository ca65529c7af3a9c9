"""Benchmark: one whole draft training step (TTT 7, forward + backward) on a GPU, specfast's fused
kernels against the same step on the kernels' plain-PyTorch references, side by side in one run.

    python bench/gpu_train_step.py                    # CUDA: SmolLM2 and Llama-3-8B drafts
    python bench/gpu_train_step.py --rows 2048,8192   # other row lengths (tokens per packed row)
    python bench/gpu_train_step.py --device cpu --quick   # smoke run of the script itself

Both sides run `specfast.ttt.ttt_unroll` on the same draft, batch and bf16 autocast (fp32 weights),
as the trainer does; only the ops differ. The baseline is the step with SPECFAST_KERNELS=reference:
[T, V] fp32 logits with log_softmax at every TTT step (the teacher's logits formed per step from its
hidden state) and attention over a dense [L, S·L] mask, i.e. what the peers' eager paths compute.
The optimizer step is left out (the same on both sides). The loss of the two sides is printed as a
check that they compute the same thing.

Shapes: SmolLM2-135M's draft (H 576, 9/3 heads of 64, MLP 1536, target vocabulary 49,152, draft
vocabulary 16,384) and a Llama-3-8B draft (H 4096, 32/8 heads of 128, MLP 14,336, vocabulary
128,256, draft vocabulary 32,000); one row of T tokens in 4 packed documents, 75% supervised.

Work counted (matmul FLOPs if every TTT step computed every row; ours skips rows no supervised
position reads, so this overstates its work a little): per token and step, the layer
2·(2H·(Hq+2Hkv)·D + Hq·D·H + 3·H·I), the head 2·H·V, the teacher 2·H_t·V, attention 4·Hq·D·(n/2+k)
for a document of n tokens at step k; fc 2·3H_t·H once per token; backward twice the forward
(without the teacher). Bytes are far below the matmuls' intensity: the step is compute-bound, so
the roofline is FLOPs / the card's dense bf16 rate (H100/H200 SXM: 989 TFLOP/s by the datasheet,
~790 measured on an H200 here).

Peak memory: torch.cuda.max_memory_allocated over the step minus the memory held before it (the
draft, its gradients from the previous step, the batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import harness
import torch

TTT = 7
DOCS = 4
SHAPES = {  # H, Hq, Hkv, D, I, target vocab, draft vocab
    "smollm2": (576, 9, 3, 64, 1536, 49152, 16384),
    "llama3-8b": (4096, 32, 8, 128, 14336, 128256, 32000),
}


def make_draft(name: str, device: str):
    from specfast.model import DraftConfig, Eagle3Draft

    H, Hq, Hkv, D, inter, V, Vd = SHAPES[name]
    cfg = DraftConfig(
        hidden_size=H, target_hidden_size=H, num_attention_heads=Hq, num_key_value_heads=Hkv,
        head_dim=D, intermediate_size=inter, vocab_size=V, draft_vocab_size=Vd,
        aux_layer_ids=[1, 14, 26], rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    draft = Eagle3Draft(cfg)
    draft.set_vocab(torch.randperm(V)[:Vd].sort().values)
    draft.attach_target(torch.randn(V, H) * 0.02)
    return draft.to(device)


def make_batch(name: str, T: int, device: str):
    from specfast.ttt import PackedBatch

    H, *_, Vd = SHAPES[name]
    g = torch.Generator().manual_seed(T)
    doc_ids = torch.arange(T) * DOCS // T
    starts = torch.arange(DOCS) * T // DOCS
    positions = torch.arange(T) - starts.repeat_interleave(torch.bincount(doc_ids, minlength=DOCS))
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    batch = PackedBatch(
        input_ids=torch.randint(0, SHAPES[name][5], (T,), generator=g),
        doc_ids=doc_ids,
        positions=positions,
        loss_mask=torch.rand(T, generator=g) < 0.75,
        aux_hidden=(torch.randn(T, 3 * H, generator=g) * 3).to(dtype),
        target_in_vocab=torch.rand(T, generator=g) < 0.93,
        teacher_hidden=torch.randn(T, H, generator=g).to(dtype),
        teacher_weight=(torch.randn(Vd, H, generator=g) * H**-0.5 * 3).to(dtype),
    )
    return type(batch)(**{k: v if v is None else v.to(device) for k, v in vars(batch).items()})


def useful_flops(name: str, T: int) -> float:
    H, Hq, Hkv, D, inter, _, Vd = SHAPES[name]
    n = T / DOCS
    layer = 2 * (2 * H * (Hq + 2 * Hkv) * D + Hq * D * H + 3 * H * inter)
    fwd = 2 * 3 * H * H * T  # fc, once
    for k in range(TTT):
        attn = 4 * Hq * D * (n / 2 + k)
        fwd_k = T * (layer + 2 * H * Vd + attn)
        fwd += 3 * fwd_k + T * 2 * H * Vd  # forward + backward (2×), and the teacher's logits
    return fwd


class Timer:
    def __init__(self, device: str):
        self.cuda = device != "cpu"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn) -> tuple[float, object]:
        """(seconds, what fn returned)."""
        self.sync()
        t0 = time.perf_counter()
        value = fn()
        self.sync()
        return time.perf_counter() - t0, value


def stepper(draft, batch, device):
    """One training step (forward + backward), returning the loss."""
    from specfast.ttt import ttt_unroll

    def step():
        draft.zero_grad(set_to_none=False)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device != "cpu"):
            res = ttt_unroll(draft, batch, TTT)
        res.loss.backward()
        return float(res.loss.detach())

    return step


WAYS = (("specfast", "auto"), ("reference", "reference"))


def measure(name: str, T: int, device: str, repeats: int) -> dict:
    draft, batch = make_draft(name, device), make_batch(name, T, device)
    timer = Timer(device)
    out = {}
    for way, kernels in WAYS:
        os.environ["SPECFAST_KERNELS"] = kernels
        step = stepper(draft, batch, device)
        try:
            timer(step)  # warm-up: Triton compiles, cuBLAS picks, gradients allocated
            if device != "cpu":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times, losses = zip(*(timer(step) for _ in range(repeats)))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device != "cpu" else None
            out[way] = {"s": statistics.median(times), "peak_gib": peak, "loss": losses[-1]}
        except torch.cuda.OutOfMemoryError:
            out[way] = "OOM"
        finally:
            os.environ.pop("SPECFAST_KERNELS", None)
            if device != "cpu":
                torch.cuda.empty_cache()
        print(f"  {name} T={T} {way}: {out[way]}", flush=True)
    return {"name": name, "T": T, **out}


def profile(name: str, T: int, device: str) -> None:
    """Where a step's GPU time goes: torch.profiler's table of one step per side after a warm-up
    (ours first), the kernels sorted by their own device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    draft, batch = make_draft(name, device), make_batch(name, T, device)
    for way, kernels in WAYS:
        os.environ["SPECFAST_KERNELS"] = kernels
        try:
            step = stepper(draft, batch, device)
            step()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print(f"--- profile: {name} T={T} {way}", flush=True)
            print(
                prof.key_averages().table(
                    sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70
                ),
                flush=True,
            )
        except torch.cuda.OutOfMemoryError:
            print(f"--- profile: {name} T={T} {way}: OOM", flush=True)
        finally:
            os.environ.pop("SPECFAST_KERNELS", None)
            torch.cuda.empty_cache()


def table_rows(results, peak_flops):
    def ms(x):
        return f"{x['s'] * 1e3:.1f}" if isinstance(x, dict) else x

    def gib(x):
        return f"{x['peak_gib']:.2f}" if isinstance(x, dict) and x["peak_gib"] is not None else "–"

    rows = []
    for r in results:
        ours, ref = r["specfast"], r["reference"]
        ok = isinstance(ours, dict) and isinstance(ref, dict)
        tf = useful_flops(r["name"], r["T"]) / ours["s"] if isinstance(ours, dict) else None
        rows.append(
            [
                r["name"],
                r["T"],
                ms(ours),
                ms(ref),
                harness.ratio(ref["s"], ours["s"]) if ok else "–",
                f"{r['T'] / ours['s']:,.0f}" if isinstance(ours, dict) else "–",
                f"{tf / 1e12:.0f} ({100 * tf / peak_flops:.0f}%)" if tf else "–",
                gib(ours),
                gib(ref),
                harness.ratio(ref["peak_gib"], ours["peak_gib"]) if ok else "–",
                f"{abs(ours['loss'] - ref['loss']) / abs(ref['loss']):.1e}" if ok else "–",
            ]
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke run)")
    p.add_argument("--rows", default="2048,8192,16384", help="row lengths in tokens")
    p.add_argument("--shapes", default="smollm2,llama3-8b", help=f"of {', '.join(SHAPES)}")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (median)")
    p.add_argument("--quick", action="store_true", help="smollm2, 256 tokens, 1 repeat, not saved")
    p.add_argument(
        "--profile", action="store_true", help="print torch.profiler's kernel tables instead"
    )
    args = p.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        p.error("no CUDA device here (use --device cpu --quick for a smoke run)")
    if args.profile:
        for name in args.shapes.split(","):
            for T in args.rows.split(","):
                profile(name, int(T), args.device)
        return 0
    if args.quick:
        args.rows, args.shapes, args.repeats = "256", "smollm2", 1
    results = [
        measure(name, int(T), args.device, args.repeats)
        for name in args.shapes.split(",")
        for T in args.rows.split(",")
    ]
    gpu = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    peak = harness.gpu_roofline(gpu)[1][0]
    body = [
        f"One training step of the draft (TTT {TTT}, forward + backward, bf16 autocast), median of "
        f"{args.repeats} after a warm-up. Baseline: the same step with SPECFAST_KERNELS=reference "
        "(every op's plain-PyTorch definition). TFLOP/s on the full-row matmul count (see the "
        f"script's docstring), % of {peak / 1e12:.0f} TFLOP/s dense bf16. Peak: extra allocated "
        "GPU memory during a step. Loss diff: |ours − reference| / reference.",
        "",
        *harness.table(
            [
                "draft", "T", "specfast ms", "reference ms", "speed-up", "specfast tok/s",
                "specfast TFLOP/s", "specfast peak GiB", "reference peak GiB", "memory saving",
                "loss diff",
            ],
            table_rows(results, peak),
        ),
    ]  # fmt: skip
    harness.write_result(
        "gpu_train_step",
        f"# Draft training step on {gpu}: fused kernels vs the references",
        body,
        device=args.device,
        save=not args.quick,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
