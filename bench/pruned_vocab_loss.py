"""Benchmark: fused pruned-vocabulary head + soft cross-entropy, forward + backward.

    python bench/pruned_vocab_loss.py          # CPU: our chunked torch path vs the reference
    python bench/pruned_vocab_loss.py --quick  # CPU, T ∈ {1k, 4k} only
    python bench/pruned_vocab_loss.py --gpu    # CUDA: ours (Triton) vs torch eager and compile

Shapes: T ∈ {1k, 4k, 16k} tokens; (H, V) ∈ {(576, 16k): SmolLM2-sized draft, (4096, 32k):
Llama-3-8B draft with the usual 32k draft vocabulary}.

Baseline: `pruned_vocab_loss_reference`, i.e. what peer trainers do at every TTT step: fp32 logits
[T, V], log_softmax, softmax of the teacher, product, sum — with [T, V] tensors kept for backward.

Work counted (the same "useful" FLOPs for every method):
    FLOPs = 6·T·H·V    forward logits (2·T·H·V) + grad_hidden (2·T·H·V) + grad_weight (2·T·H·V)
Ours recomputes the logits in the backward instead of storing them, so it executes 8·T·H·V; the
TFLOP/s column still divides 6·T·H·V by the time, so recompute shows up as lost throughput.
Bytes (minimum traffic, element size e): forward reads hidden, weight and the teacher logits
(e·(T·H + V·H + T·V)); backward reads them again and writes grad_hidden and grad_weight
(e·(2·T·H + 2·V·H + T·V)). At (T, H, V) = (16k, 4096, 32k), bf16: 6·T·H·V = 13.2 TFLOP
against 3.36 GB of traffic, an arithmetic intensity of ~3,900 FLOP/byte, far above the H100's
ridge point (989 dense bf16 TFLOP/s ÷ 3.35 TB/s ≈ 295 FLOP/byte): the op is compute-bound, so
the roofline time is 6·T·H·V / 989 TFLOP/s (H100 SXM) and "% of roofline" is achieved TFLOP/s
÷ 989. With the recompute, ours cannot exceed 75% of it.

CPU peak memory: every (method, shape) runs in a fresh process (bench/harness.py's run_child, with
this process's torch thread count); peak = the extra RSS of one forward + backward over the inputs,
as bench/harness.py defines it. The grads (T·H + V·H fp32) are part of both methods' peaks.
GPU peak memory: torch.cuda.max_memory_allocated over forward + backward, minus the inputs.
"""

import argparse
import os
from functools import partial

import torch
from harness import cpu_model, ratio, run_child, write_result
from specfast.kernels import pruned_vocab_loss, pruned_vocab_loss_reference

TOKENS = [1024, 4096, 16384]
SHAPES = [(576, 16384), (4096, 32768)]  # (H, V)
H100_BF16_TFLOPS = 989.0  # dense, SXM
H100_TBPS = 3.35


def make_inputs(T, H, V, device, dtype, seed=0):
    """In-place scaling so that creating the inputs leaves no transient peak behind."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, device=device, dtype=dtype)
    weight = torch.randn(V, H, generator=g, device=device, dtype=dtype).mul_(H**-0.5)
    teacher = torch.randn(T, V, generator=g, device=device, dtype=dtype).mul_(2.0)
    mask = torch.rand(T, generator=g, device=device) < 0.9
    return hidden.requires_grad_(), weight.requires_grad_(), teacher, mask


def flops(T, H, V):
    return 6 * T * H * V


def min_bytes(T, H, V, e):
    return e * (T * H + V * H + T * V) + e * (2 * T * H + 2 * V * H + T * V)


def fwd_bwd(fn, hidden, weight, teacher, mask):
    loss, _ = fn(hidden, weight, teacher, mask)
    return torch.autograd.grad(loss, (hidden, weight))


METHODS = {
    "ours": lambda h, w, t, m: pruned_vocab_loss(h, w, t, m, backend="auto"),
    "reference": pruned_vocab_loss_reference,
}


# ---------------------------------------------------------------------------------------------- CPU
def cpu_case(method, T, H, V):
    """In the child, not measured: warm up, make the inputs; returns the measured step."""
    fn = METHODS[method]
    # Thread pools and allocator warm-up are not part of the peak.
    fwd_bwd(fn, *make_inputs(8, H, 64, "cpu", torch.float32))
    inputs = make_inputs(T, H, V, "cpu", torch.float32)

    def step():
        fwd_bwd(fn, *inputs)  # the grads are dropped here, not sent back

    return step


def run_case(method, T, H, V, threads):
    m = run_child(cpu_case, method, T, H, V, threads=threads)
    return {"s": m.seconds, "peak_mib": m.peak_mib}


def best_of(results):
    """Fastest time (the least disturbed by other load on a shared machine) and the largest peak."""
    return {"s": min(r["s"] for r in results), "peak_mib": max(r["peak_mib"] for r in results)}


def reference_peak_estimate_gib(T, V):
    """The reference keeps ~5 fp32 [T, V] tensors alive at its peak (logits, log-probs, teacher
    probs, their product, then the grads of the backward)."""
    return 5 * 4 * T * V / 2**30


def run_cpu(args):
    tokens = [1024, 4096] if args.quick else TOKENS
    threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    rows = []
    for H, V in SHAPES:
        for T in tokens:
            est = reference_peak_estimate_gib(T, V)
            with_ref = est <= args.ref_cap_gib
            ours, ref = [], []
            # Interleaved, so that load swings hit both alike.
            for _ in range(args.rounds if with_ref else 1):
                ours.append(run_case("ours", T, H, V, threads))
                if with_ref:
                    ref.append(run_case("reference", T, H, V, threads))
            rows.append((T, H, V, best_of(ours), best_of(ref) if ref else None, est))
            print(_cpu_row(*rows[-1], args.ref_cap_gib), flush=True)
    load_after = os.getloadavg()[0]

    title = f"### CPU ({cpu_model()}, {threads} threads, torch {torch.__version__}, fp32)"
    lines = [
        "Forward + backward, "
        f"90% of rows supervised, best of {args.rounds} interleaved runs (ours, reference, ours, "
        "...; 1 run where the reference is not run), each in a fresh process. Peak = extra RSS "
        f"over the inputs. 1-min load average {load_before:.1f} before, {load_after:.1f} after "
        "(times are inflated when it exceeds the thread count: the machine is shared). GFLOP/s "
        "counts 6·T·H·V.",
        "",
        "| T | H | V | ours (s) | reference (s) | speed-up | ours GFLOP/s | ours peak (MiB) "
        "| reference peak (MiB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_cpu_row(*r, args.ref_cap_gib) for r in rows]
    write_result("pruned_vocab_loss", title, lines)


def _cpu_row(T, H, V, ours, ref, est, cap):
    gflops = flops(T, H, V) / ours["s"] / 1e9
    head = f"| {T} | {H} | {V} | {ours['s']:.2f} |"
    if ref is None:
        return (
            f"{head} not run: est. peak {est:.0f} GiB > {cap:.0f} GiB cap (shared 24 GiB "
            f"machine) | | {gflops:.1f} | {ours['peak_mib']:.0f} | | |"
        )
    return (
        f"{head} {ref['s']:.2f} | {ratio(ref['s'], ours['s'])} | {gflops:.1f} | "
        f"{ours['peak_mib']:.0f} | {ref['peak_mib']:.0f} | "
        f"{ratio(ref['peak_mib'], max(ours['peak_mib'], 1), 1)} |"
    )


# ---------------------------------------------------------------------------------------------- GPU
def run_gpu(args):
    import triton.testing

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    is_h100 = "H100" in name
    compiled = torch.compile(pruned_vocab_loss_reference)
    methods = {"ours": METHODS["ours"], "eager": pruned_vocab_loss_reference, "compile": compiled}
    rows = []
    for H, V in SHAPES:
        for T in TOKENS:
            inputs = make_inputs(T, H, V, dev, torch.bfloat16)
            row = {"T": T, "H": H, "V": V}
            for label, fn in methods.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                try:
                    fwd_bwd(fn, *inputs)  # warm-up / compile
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    ms = triton.testing.do_bench(
                        partial(fwd_bwd, fn, *inputs), return_mode="median"
                    )
                    row[label] = {"ms": ms, "tflops": flops(T, H, V) / ms / 1e9, "peak_mib": peak}
                except torch.cuda.OutOfMemoryError:
                    row[label] = None
                torch.cuda.empty_cache()
            rows.append(row)
            print(_gpu_row(row, is_h100), flush=True)
            del inputs

    title = f"### CUDA ({name}, torch {torch.__version__}, triton {triton.__version__}, bf16)"
    lines = [
        "Forward + backward, 90% of rows supervised, "
        "`triton.testing.do_bench` median. TFLOP/s counts 6·T·H·V; roofline = H100 SXM 989 dense "
        "bf16 TFLOP/s (compute-bound: see the script's docstring). Peak = max allocated over the "
        "inputs.",
        "",
        "| T | H | V | ours (ms) | ours TFLOP/s | % roofline | eager (ms) | compile (ms) "
        "| vs eager | vs compile | ours peak (MiB) | eager peak (MiB) | compile peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_gpu_row(r, is_h100) for r in rows]
    write_result("pruned_vocab_loss", title, lines, device="cuda")


def _gpu_row(r, is_h100):
    def cell(m, key, fmt):
        return fmt.format(r[m][key]) if r.get(m) else "OOM"

    ours = r["ours"]
    roof = f"{100 * ours['tflops'] / H100_BF16_TFLOPS:.0f}%" if (ours and is_h100) else "n/a"

    def vs(m):
        return ratio(r[m]["ms"], ours["ms"]) if (ours and r.get(m)) else "n/a"

    ms, peak = "{:.3f}", "{:.0f}"
    return (
        f"| {r['T']} | {r['H']} | {r['V']} | {cell('ours', 'ms', ms)} "
        f"| {cell('ours', 'tflops', '{:.0f}')} | {roof} | {cell('eager', 'ms', ms)} "
        f"| {cell('compile', 'ms', ms)} | {vs('eager')} | {vs('compile')} "
        f"| {cell('ours', 'peak_mib', peak)} | {cell('eager', 'peak_mib', peak)} "
        f"| {cell('compile', 'peak_mib', peak)} |"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--gpu", action="store_true", help="CUDA benchmark (Triton) instead of the CPU one"
    )
    ap.add_argument("--quick", action="store_true", help="CPU: T ∈ {1k, 4k} only")
    ap.add_argument(
        "--ref-cap-gib",
        type=float,
        default=8.0,
        help="CPU: skip the reference where its estimated peak exceeds this",
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="CPU: interleaved runs per method and shape"
    )
    args = ap.parse_args()
    if args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
