"""Benchmark: fused pruned-vocabulary head + soft cross-entropy, forward + backward.

    python bench/pruned_vocab_loss.py          # CPU: our chunked torch path vs the reference,
                                               # kept vs recomputed logits, teacher from hidden
    python bench/pruned_vocab_loss.py --quick  # CPU, T ≤ 4k in the main table, ≤ 8k in the others
    python bench/pruned_vocab_loss.py --gpu    # CUDA: ours (Triton) vs torch eager and compile

Shapes: T ∈ {1k, 4k, 16k} tokens; (H, V) ∈ {(576, 16k): SmolLM2-sized draft, (4096, 32k):
Llama-3-8B draft with the usual 32k draft vocabulary}. The keep and teacher tables use the
SmolLM2 shape (H = H_t = 576, V = 16k) at T = 2k (the default training row) and 8k (the row the
2 GB training-step budget is set for).

Baseline: `pruned_vocab_loss_reference`, i.e. what peer trainers do at every TTT step: fp32 logits
[T, V], log_softmax, softmax of the teacher, product, sum — with [T, V] tensors kept for backward.

Work counted (the same "useful" FLOPs for every method):
    FLOPs = 6·T·H·V    forward logits (2·T·H·V) + grad_hidden (2·T·H·V) + grad_weight (2·T·H·V)
Ours keeps each chunk's grad_logits from the forward while they fit in `keep_bytes` (default
128 MiB per call) and recomputes the logits in the backward beyond it: a kept row costs 6·T·H·V
like the reference, a recomputed one 8·T·H·V. The TFLOP/s column divides 6·T·H·V by the time, so
recompute shows up as lost throughput. A teacher given as hidden state (teacher_hidden [T, H_t],
teacher_weight [V, H_t]) adds 2·T·H_t·V in the forward and again in the backward of recomputed
chunks; the "logits" baselines of the teacher table pay the same 2·T·H_t·V once, to form the
[T, V] teacher logits that the method then reads.
Bytes (minimum traffic, element size e): forward reads hidden, weight and the teacher logits
(e·(T·H + V·H + T·V)); backward reads them again and writes grad_hidden and grad_weight
(e·(2·T·H + 2·V·H + T·V)). Keeping adds 4·T·V written by the forward and 8·T·V read by the
backward (grad_logits enters both matmuls) and drops the backward's teacher read; a teacher from
hidden replaces each read of the teacher logits (e·T·V) by e·(T·H_t + V·H_t).
At (T, H, V) = (16k, 4096, 32k), bf16: 6·T·H·V = 13.2 TFLOP
against 3.36 GB of traffic, an arithmetic intensity of ~3,900 FLOP/byte, far above the H100's
ridge point (989 dense bf16 TFLOP/s ÷ 3.35 TB/s ≈ 295 FLOP/byte): the op is compute-bound, so
the roofline time is 6·T·H·V / 989 TFLOP/s (H100 SXM) and "% of roofline" is achieved TFLOP/s
÷ 989. The Triton path always recomputes (pruned_vocab_loss.py says why), so it cannot exceed 75%.

CPU peak memory: every (method, shape) runs in a fresh process (bench/harness.py's run_child, with
this process's torch thread count); peak = the extra RSS of one forward + backward over the inputs,
as bench/harness.py defines it. The grads (T·H + V·H fp32) are part of every method's peak; so are
the kept grad_logits (up to keep_bytes) and, in the teacher table, the [T, V] teacher logits that
the "logits" methods form inside the measured step.
GPU peak memory: torch.cuda.max_memory_allocated over forward + backward, minus the inputs.
"""

import argparse
import os
from functools import partial

import torch
from harness import cpu_model, gpu_roofline, ratio, run_child, write_result
from specfast.kernels import pruned_vocab_loss, pruned_vocab_loss_reference

TOKENS = [1024, 4096, 16384]
SHAPES = [(576, 16384), (4096, 32768)]  # (H, V)


def make_inputs(T, H, V, device, dtype, seed=0, teacher=True):
    """In-place scaling so that creating the inputs leaves no transient peak behind. teacher=False
    leaves the [T, V] teacher logits out (None)."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, device=device, dtype=dtype)
    weight = torch.randn(V, H, generator=g, device=device, dtype=dtype).mul_(H**-0.5)
    logits = None
    if teacher:
        logits = torch.randn(T, V, generator=g, device=device, dtype=dtype).mul_(2.0)
    mask = torch.rand(T, generator=g, device=device) < 0.9
    return hidden.requires_grad_(), weight.requires_grad_(), logits, mask


def make_teacher_hidden(T, Ht, V, device, dtype, seed=1):
    """The target's final hidden state and its lm_head rows for the draft ids: teacher logits of
    spread ~2, like make_inputs' teacher."""
    g = torch.Generator(device=device).manual_seed(seed)
    th = torch.randn(T, Ht, generator=g, device=device, dtype=dtype)
    tw = torch.randn(V, Ht, generator=g, device=device, dtype=dtype).mul_(2.0 * Ht**-0.5)
    return th, tw


def flops(T, H, V):
    return 6 * T * H * V


def min_bytes(T, H, V, e):
    return e * (T * H + V * H + T * V) + e * (2 * T * H + 2 * V * H + T * V)


def fwd_bwd(fn, hidden, weight, *teacher_and_mask):
    loss, _ = fn(hidden, weight, *teacher_and_mask)
    return torch.autograd.grad(loss, (hidden, weight))


METHODS = {
    "ours": lambda h, w, t, m: pruned_vocab_loss(h, w, t, m, backend="auto"),
    "reference": pruned_vocab_loss_reference,
}

# keep_bytes of the torch path: none kept, the default budget, everything kept
KEEPS = {"recompute": 0, "default": None, "kept": 1 << 62}


def _ours_keep(keep):
    return lambda h, w, t, m: pruned_vocab_loss(h, w, t, m, backend="torch", keep_bytes=keep)


# (hidden, weight, teacher_hidden, teacher_weight, mask) → (loss, correct)
TEACHER_METHODS = {
    "from hidden": lambda h, w, th, tw, m: pruned_vocab_loss(
        h, w, None, m, teacher_hidden=th, teacher_weight=tw, backend="torch"
    ),
    "logits + ours": lambda h, w, th, tw, m: pruned_vocab_loss(h, w, th @ tw.t(), m),
    "logits + reference": lambda h, w, th, tw, m: pruned_vocab_loss_reference(h, w, th @ tw.t(), m),
}
KEEP_TOKENS = [2048, 8192]
KEEP_SHAPE = (576, 16384)  # (H, V); H_t = H for the teacher table, as in SmolLM2


# ---------------------------------------------------------------------------------------------- CPU
def cpu_case(method, T, H, V):
    """In the child, not measured: warm up, make the inputs; returns the measured step.
    method: a METHODS name, ("keep", a KEEPS name) or ("teacher", a TEACHER_METHODS name)."""
    if isinstance(method, tuple) and method[0] == "teacher":
        fn = TEACHER_METHODS[method[1]]
        # Thread pools and allocator warm-up are not part of the peak.
        h, w, _, m = make_inputs(8, H, 64, "cpu", torch.float32, teacher=False)
        fwd_bwd(fn, h, w, *make_teacher_hidden(8, H, 64, "cpu", torch.float32), m)
        hidden, weight, _, mask = make_inputs(T, H, V, "cpu", torch.float32, teacher=False)
        th, tw = make_teacher_hidden(T, H, V, "cpu", torch.float32)

        def step():
            fwd_bwd(fn, hidden, weight, th, tw, mask)

        return step
    fn = _ours_keep(KEEPS[method[1]]) if isinstance(method, tuple) else METHODS[method]
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
    threads = torch.get_num_threads()
    sections = set(args.sections.split(","))
    load_before = os.getloadavg()[0]
    title = f"### CPU ({cpu_model()}, {threads} threads, torch {torch.__version__}, fp32)"
    lines = [
        "Forward + backward, "
        f"90% of rows supervised, best of {args.rounds} interleaved runs (the methods of a row in "
        "turn, then again; 1 run where the reference is not run), each in a fresh process. Peak "
        "= extra RSS over the inputs. Times are inflated when the load average exceeds the "
        "thread count: the machine is shared.",
    ]
    if "main" in sections:
        lines += ["", *_main_table(args, threads)]
    if "keep" in sections:
        lines += ["", *_keep_table(args, threads)]
    if "teacher" in sections:
        lines += ["", *_teacher_table(args, threads)]
    lines += ["", f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after."]
    write_result("pruned_vocab_loss", title, lines)


def _interleaved(methods, T, H, V, threads, rounds):
    """{method: best_of(its runs)}, the methods run in turn `rounds` times, so that load swings
    hit them alike."""
    runs = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            runs[m].append(run_case(m, T, H, V, threads))
    return {m: best_of(r) for m, r in runs.items()}


def _main_table(args, threads):
    tokens = [1024, 4096] if args.quick else TOKENS
    rows = []
    for H, V in SHAPES:
        for T in tokens:
            est = reference_peak_estimate_gib(T, V)
            with_ref = est <= args.ref_cap_gib
            methods = ["ours", "reference"] if with_ref else ["ours"]
            r = _interleaved(methods, T, H, V, threads, args.rounds if with_ref else 1)
            rows.append((T, H, V, r["ours"], r.get("reference"), est))
            print(_cpu_row(*rows[-1], args.ref_cap_gib), flush=True)
    return [
        "Ours (chunked torch path, default keep_bytes = 128 MiB) against the reference. GFLOP/s "
        "counts 6·T·H·V.",
        "",
        "| T | H | V | ours (s) | reference (s) | speed-up | ours GFLOP/s | ours peak (MiB) "
        "| reference peak (MiB) | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[_cpu_row(*r, args.ref_cap_gib) for r in rows],
    ]


def _keep_table(args, threads):
    H, V = KEEP_SHAPE
    tokens = KEEP_TOKENS if args.quick else KEEP_TOKENS + [16384]
    out = [
        f"Kept vs recomputed logits (torch path, H = {H}, V = {V}): keep_bytes = 0 (every "
        "chunk's logits recomputed in the backward, 8·T·H·V FLOPs), the default 128 MiB, and "
        "unlimited (every chunk's fp32 grad_logits kept from the forward, T·V·4 bytes, "
        "6·T·H·V FLOPs). GFLOP/s counts 6·T·H·V.",
        "",
        "| T | recompute (s) | default (s) | kept (s) | kept vs recompute | kept GFLOP/s "
        "| recompute peak (MiB) | default peak (MiB) | kept peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for T in tokens:
        r = _interleaved([("keep", k) for k in KEEPS], T, H, V, threads, args.rounds)
        rec, dft, kept = (r[("keep", k)] for k in KEEPS)
        out.append(
            f"| {T} | {rec['s']:.2f} | {dft['s']:.2f} | {kept['s']:.2f} "
            f"| {ratio(rec['s'], kept['s'])} | {flops(T, H, V) / kept['s'] / 1e9:.1f} "
            f"| {rec['peak_mib']:.0f} | {dft['peak_mib']:.0f} | {kept['peak_mib']:.0f} |"
        )
        print(out[-1], flush=True)
    return out


def _teacher_table(args, threads):
    H, V = KEEP_SHAPE
    tokens = KEEP_TOKENS if args.quick else KEEP_TOKENS + [16384]
    names = list(TEACHER_METHODS)
    out = [
        f'Teacher from hidden state (H = H_t = {H}, V = {V}, default keep_bytes). "from '
        'hidden": ours given teacher_hidden [T, H_t] and teacher_weight [V, H_t], forming the '
        'teacher logits chunk by chunk; "logits + ours" / "logits + reference": the step '
        "first forms the [T, V] fp32 teacher logits (teacher_hidden @ teacher_weightᵀ, as a "
        "target's lm_head does), then runs ours / the reference on them. All three do the "
        'teacher\'s 2·T·H_t·V once in the forward; "from hidden" repeats it in the backward '
        "for the chunks beyond the keep budget.",
        "",
        "| T | "
        + " | ".join(f"{n} (s)" for n in names)
        + " | from hidden vs logits + ours | "
        + " | ".join(f"{n} peak (MiB)" for n in names)
        + " |",
        "|---|" + "---|" * (2 * len(names) + 1),
    ]
    for T in tokens:
        r = _interleaved([("teacher", n) for n in names], T, H, V, threads, args.rounds)
        res = [r[("teacher", n)] for n in names]
        out.append(
            f"| {T} | "
            + " | ".join(f"{x['s']:.2f}" for x in res)
            + f" | {ratio(res[1]['s'], res[0]['s'])} | "
            + " | ".join(f"{x['peak_mib']:.0f}" for x in res)
            + " |"
        )
        print(out[-1], flush=True)
    return out


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
    hopper = "H100" in name or "H200" in name  # the % column only against a known roofline
    peak_tflops = gpu_roofline(name)[1][0] / 1e12
    compiled = torch.compile(pruned_vocab_loss_reference)
    methods = {
        "ours": METHODS["ours"],
        "triton": lambda h, w, t, m: pruned_vocab_loss(h, w, t, m, backend="triton"),
        "eager": pruned_vocab_loss_reference,
        "compile": compiled,
    }
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
            print(_gpu_row(row, hopper, peak_tflops), flush=True)
            del inputs

    title = f"### CUDA ({name}, torch {torch.__version__}, triton {triton.__version__}, bf16)"
    lines = [
        "Forward + backward, 90% of rows supervised, "
        "`triton.testing.do_bench` median. ours: backend auto (the chunked path on cuBLAS); "
        "triton: our Triton kernel. TFLOP/s counts 6·T·H·V; roofline = H100/H200 SXM 989 dense "
        "bf16 TFLOP/s (compute-bound: see the script's docstring). Peak = max allocated over the "
        "inputs.",
        "",
        "| T | H | V | ours (ms) | ours TFLOP/s | % roofline | triton (ms) | eager (ms) "
        "| compile (ms) | vs triton | vs eager | vs compile | ours peak (MiB) | triton peak (MiB) "
        "| eager peak (MiB) | compile peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_gpu_row(r, hopper, peak_tflops) for r in rows]
    write_result("pruned_vocab_loss", title, lines, device="cuda")


def _gpu_row(r, hopper, peak_tflops):
    def cell(m, key, fmt):
        return fmt.format(r[m][key]) if r.get(m) else "OOM"

    ours = r["ours"]
    roof = f"{100 * ours['tflops'] / peak_tflops:.0f}%" if (ours and hopper) else "n/a"

    def vs(m):
        return ratio(r[m]["ms"], ours["ms"]) if (ours and r.get(m)) else "n/a"

    ms, peak = "{:.3f}", "{:.0f}"
    return (
        f"| {r['T']} | {r['H']} | {r['V']} | {cell('ours', 'ms', ms)} "
        f"| {cell('ours', 'tflops', '{:.0f}')} | {roof} | {cell('triton', 'ms', ms)} "
        f"| {cell('eager', 'ms', ms)} | {cell('compile', 'ms', ms)} | {vs('triton')} "
        f"| {vs('eager')} | {vs('compile')} | {cell('ours', 'peak_mib', peak)} "
        f"| {cell('triton', 'peak_mib', peak)} | {cell('eager', 'peak_mib', peak)} "
        f"| {cell('compile', 'peak_mib', peak)} |"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--gpu", action="store_true", help="CUDA benchmark (Triton) instead of the CPU one"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU: main table at T ∈ {1k, 4k}, keep and teacher tables at T ∈ {2k, 8k}",
    )
    ap.add_argument(
        "--sections",
        default="main,keep,teacher",
        help="CPU: which tables, comma-separated (main, keep, teacher); the results file then "
        "holds only those",
    )
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
