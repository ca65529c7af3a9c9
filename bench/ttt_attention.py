"""Benchmark: fused TTT attention (causal + S−1 diagonals, packed documents), forward + backward.

    python bench/ttt_attention.py          # CPU: ours vs the peers' dense-score approach
    python bench/ttt_attention.py --quick  # CPU smoke run (L in {512, 1024}), not saved
    python bench/ttt_attention.py --gpu    # CUDA: ours (Triton) vs flex_attention vs SDPA + mask

Baselines
- dense (CPU): what peer trainers do each TTT step: a [B, Hq, L, L+S−1] fp32 score tensor (step-0
  causal block plus one column per diagonal step), masked, softmaxed, split back onto the values.
- flex (CUDA): torch.compile'd `flex_attention` over the keys of all steps concatenated along the
  sequence ([B, Hkv, S·L, D]) with the equivalent block mask; mask build time is reported apart
  (peers rebuild it every step).
- sdpa (CUDA): `scaled_dot_product_attention` with a dense boolean [B, 1, L, S·L] mask and KV heads
  expanded to Hq.

Work counted (the same "useful" FLOPs for every method, the flash-attention convention):
    P       = Σ_docs n(n+1)/2      visible step-0 (query, key) pairs per head (≈ L²/2, 1 doc)
    fwd     = 4·B·Hq·D·(P + (S−1)·L)   two matmuls (QKᵀ, PV) at 2 FLOPs per multiply-add
    bwd     = 10·B·Hq·D·(P + (S−1)·L)  five (QKᵀ recompute, dV, dP, dQ, dK)
    fwd+bwd = 14·B·Hq·D·(P + (S−1)·L)
Bytes (minimum traffic, element size e): forward reads q and S steps of keys and values and
writes out and the fp32 LSE: e·(2·B·Hq·L·D + 2·S·B·Hkv·L·D) + 4·B·Hq·L; backward reads q, keys,
values, out, dO, LSE, Δ and writes dq, dkeys, dvalues: e·(4·B·Hq·L·D + 4·S·B·Hkv·L·D) + 8·B·Hq·L.
At L ≥ 1k the causal part dominates and is compute-bound, so the roofline is FLOPs / peak tensor
throughput (H100 SXM: 989 dense bf16 TFLOP/s, 3.35 TB/s).

CPU numbers: every (method, L) runs in a fresh process (bench/harness.py's run_child) with
BENCH_THREADS threads (default 2); peak memory is the extra RSS of the first forward + backward
over the inputs, as bench/harness.py defines it; the time is the best of the repeats after it.
"""

import argparse
import os
import time
from functools import partial

import torch
from harness import ChildError, cpu_model, gpu_roofline, ratio, run_child, write_result
from specfast.kernels import ttt_attention, ttt_attention_reference

S, B = 7, 1
HEADS = {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # Hq, Hkv, D
CPU_MEMORY_GIB = 24


# ------------------------------------------------------------------------------------------- inputs
def doc_ids_for(L, doc_len, device):
    """Packed row of equal-length documents (the last one shorter), or None for one document."""
    if doc_len is None or doc_len >= L:
        return None
    return (torch.arange(L, device=device) // doc_len)[None].expand(B, L).contiguous()


def make_inputs(L, heads, doc_len, device, dtype):
    Hq, Hkv, D = heads
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, Hq, L, D, generator=g).to(device, dtype).requires_grad_()
    keys = torch.randn(S, B, Hkv, L, D, generator=g).to(device, dtype).requires_grad_()
    values = torch.randn(S, B, Hkv, L, D, generator=g).to(device, dtype).requires_grad_()
    return q, keys, values, doc_ids_for(L, doc_len, device)


def useful_flops(L, heads, doc_len):
    Hq, _, D = heads
    if doc_len is None or doc_len >= L:
        lens = [L]
    else:
        lens = [doc_len] * (L // doc_len) + ([L % doc_len] if L % doc_len else [])
    pairs = sum(n * (n + 1) // 2 for n in lens)
    return 14 * B * Hq * D * (pairs + (S - 1) * L)


# ---------------------------------------------------------------------------------------- baselines
def dense_peer(q, keys, values, doc_ids, scale=None):
    """The peers' per-step attention: an fp32 [B, Hq, L, L+S−1] score tensor."""
    _, _, Hkv, L, D = keys.shape
    Hq = q.shape[1]
    g = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qf = q.float()
    k0 = keys[0].float().repeat_interleave(g, dim=1)
    v0 = values[0].float().repeat_interleave(g, dim=1)
    scores = (qf @ k0.transpose(-1, -2)) * scale  # [B, Hq, L, L]
    i = torch.arange(L, device=q.device)
    visible = (i[:, None] >= i[None, :])[None]
    if doc_ids is not None:
        visible = visible & (doc_ids[:, :, None] == doc_ids[:, None, :])
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    ks = keys[1:].float().repeat_interleave(g, dim=2)  # [S-1, B, Hq, L, D]
    vs = values[1:].float().repeat_interleave(g, dim=2)
    diag = torch.einsum("bhld,sbhld->bhls", qf, ks) * scale  # [B, Hq, L, S-1]
    probs = torch.softmax(torch.cat([scores, diag], dim=-1), dim=-1)
    out = probs[..., :L] @ v0 + torch.einsum("bhls,sbhld->bhld", probs[..., L:], vs)
    return out.to(q.dtype)


def flex_setup(q, keys, values, doc_ids):
    """Build the block mask once (returns its build time) and a closure running compiled flex."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _, Bk, Hkv, L, D = keys.shape
    docs = doc_ids if doc_ids is not None else torch.zeros(Bk, L, dtype=torch.long, device=q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx % L
        step0 = (kv_idx < L) & (j <= q_idx) & (docs[b, j] == docs[b, q_idx])
        return step0 | ((kv_idx >= L) & (j == q_idx))

    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, Bk, None, L, S * L, device=q.device)
    sync()
    build_s = time.perf_counter() - t0
    flex = torch.compile(flex_attention) if q.is_cuda else flex_attention

    def run(q, keys, values):
        k = keys.permute(1, 2, 0, 3, 4).reshape(Bk, Hkv, -1, D)  # the peers' concatenation
        v = values.permute(1, 2, 0, 3, 4).reshape(Bk, Hkv, -1, D)
        return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

    return run, build_s


def sdpa_dense(q, keys, values, doc_ids):
    _, Bk, Hkv, L, D = keys.shape
    g = q.shape[1] // Hkv
    k = keys.permute(1, 2, 0, 3, 4).reshape(Bk, Hkv, -1, D).repeat_interleave(g, dim=1)
    v = values.permute(1, 2, 0, 3, 4).reshape(Bk, Hkv, -1, D).repeat_interleave(g, dim=1)
    i = torch.arange(L, device=q.device)
    causal = (i[:, None] >= i[None, :])[None]
    if doc_ids is not None:
        causal = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
    diag = torch.eye(L, dtype=torch.bool, device=q.device)[None].expand(Bk, L, L)
    mask = torch.cat([causal.expand(Bk, L, L)] + [diag] * (S - 1), dim=-1)[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------- CPU
def cpu_case(method, L, doc_len):
    """In the child, not measured: make the inputs; returns the measured forward + backward."""
    q, keys, values, doc_ids = make_inputs(L, HEADS["smollm2"], doc_len, "cpu", torch.float32)
    fn = {"ours": lambda *a: ttt_attention(*a, backend="torch"), "dense": dense_peer}[method]

    def step():
        out = fn(q, keys, values, doc_ids)
        out.backward(torch.ones_like(out))
        q.grad = keys.grad = values.grad = None

    return step


def check_cpu_paths():
    """Both timed CPU methods agree with the reference before anything is timed."""
    q, keys, values, doc_ids = make_inputs(300, HEADS["smollm2"], 70, "cpu", torch.float32)
    ref = ttt_attention_reference(q, keys, values, doc_ids)
    for fn in (lambda *a: ttt_attention(*a, backend="torch"), dense_peer):
        torch.testing.assert_close(fn(q, keys, values, doc_ids), ref, atol=1e-4, rtol=1e-4)


def subprocess_case(method, L, doc_len, reps, threads):
    try:
        m = run_child(cpu_case, method, L, doc_len, threads=threads, repeats=reps)
    except ChildError as e:  # e.g. out of memory at a large L: a table cell, not the end of the run
        return {"error": e.detail}
    return {"seconds": m.best, "peak_mib": m.peak_mib}


def run_cpu(lengths, doc_len, dense_max_l):
    """Per L: ours on one document, ours on packed documents, and the dense baseline (whose work
    does not depend on the documents; run on the packed layout)."""
    load_before = os.getloadavg()[0]
    check_cpu_paths()
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    rows = []
    for L in lengths:
        # The first run already times one step; 16k steps take tens of seconds.
        reps = 2 if L <= 4096 else 0
        row = {"L": L}
        for key, method, docs in (
            ("ours_1doc", "ours", None),
            ("ours_docs", "ours", doc_len),
            ("dense", "dense", doc_len),
        ):
            if method == "dense" and L > dense_max_l:
                row[key] = None
                continue
            row[key] = subprocess_case(method, L, docs, reps, threads)
            print(f"  L={L} {key}: {row[key]}", flush=True)
        rows.append(row)
    return rows, threads, (load_before, os.getloadavg()[0])


def packed_strategies(L=4096, n_docs=8):
    """Forward of the causal part alone on packed documents: the CPU flash kernel with a
    block-diagonal additive mask (its masked path visits every tile) vs one causal call per
    document (ours)."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    Hq, _, D = HEADS["smollm2"]
    q, k, v = (torch.randn(1, Hq, L, D) for _ in range(3))
    doc = torch.arange(L) // (L // n_docs)
    visible = (doc[:, None] == doc[None, :]) & torch.ones(L, L, dtype=torch.bool).tril()
    bias = torch.zeros(L, L).masked_fill(~visible, float("-inf"))
    n = L // n_docs
    cases = {
        "one causal call, no documents (reference point)": lambda: flash(q, k, v, 0.0, True),
        "one call, block-diagonal mask": lambda: flash(q, k, v, 0.0, False, attn_mask=bias),
        "one causal call per document (ours)": lambda: [
            flash(q[:, :, s : s + n], k[:, :, s : s + n], v[:, :, s : s + n], 0.0, True)
            for s in range(0, L, n)
        ],
    }
    out = {}
    for name, fn in cases.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        out[name] = (time.perf_counter() - t0) / 3
    return L, n_docs, out


def _cell(r, key, field):
    v = r.get(key)
    if v is None or "error" in v:
        return "–"
    return f"{v[field]:.3f}" if field == "seconds" else f"{v[field]:.0f}"


def cpu_table(rows, threads, doc_len, load, strategies):
    title = f"### CPU ({cpu_model()}, {threads} threads, torch {torch.__version__}, fp32)"
    lines = [
        f'Forward + backward of one TTT step, B={B}, Hq=9, Hkv=3, D=64, S={S}. "1 doc": one '
        f'document per row; "packed": documents of {doc_len} tokens. dense = the peers\' '
        "[B, Hq, L, L+S−1] fp32 scores (same work with or without documents; run packed). Peak = "
        f"extra RSS over the inputs. 1-min load average {load[0]:.1f} before, {load[1]:.1f} "
        "after: the machine is shared, so times are inflated where it exceeds the thread count.",
        "",
        "| L | ours 1 doc (s) | ours packed (s) | dense (s) | speed-up 1 doc | speed-up packed "
        "| ours 1 doc peak (MiB) | ours packed peak (MiB) | dense peak (MiB) "
        "| memory ratio (1 doc) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o1, op, d = r["ours_1doc"], r["ours_docs"], r["dense"]
        ok = lambda x: x is not None and "error" not in x  # noqa: E731
        if ok(d):
            dense_s, dense_mem = f"{d['seconds']:.3f}", f"{d['peak_mib']:.0f}"
            sp1 = ratio(d["seconds"], o1["seconds"], 1) if ok(o1) else "–"
            spp = ratio(d["seconds"], op["seconds"], 1) if ok(op) else "–"
            memr = ratio(d["peak_mib"], max(o1["peak_mib"], 1), 0) if ok(o1) else "–"
        else:
            dense_s = dense_skip_note(rows, r["L"]) if d is None else f"failed: {d['error']}"
            dense_mem = sp1 = spp = memr = "–"
        lines.append(
            f"| {r['L']} | {_cell(r, 'ours_1doc', 'seconds')} "
            f"| {_cell(r, 'ours_docs', 'seconds')} | {dense_s} | {sp1} | {spp} "
            f"| {_cell(r, 'ours_1doc', 'peak_mib')} | {_cell(r, 'ours_docs', 'peak_mib')} "
            f"| {dense_mem} | {memr} |"
        )
    L, n_docs, times = strategies
    lines += [
        "",
        f"Causal part on packed documents, forward only, L={L}, {n_docs} documents: how to drive "
        "PyTorch's CPU flash kernel.",
        "",
        "| strategy | seconds |",
        "|---|---|",
    ] + [f"| {name} | {t:.3f} |" for name, t in times.items()]
    return title, lines


def dense_skip_note(rows, L):
    """Why the dense baseline was not run at L: its peak extrapolated by L² from the largest
    measured L."""
    measured = [r for r in rows if r.get("dense") and "peak_mib" in r["dense"]]
    if not measured:
        return "not run"
    ref = max(measured, key=lambda r: r["L"])
    est_gib = ref["dense"]["peak_mib"] * (L / ref["L"]) ** 2 / 1024
    return f"not run: est. peak {est_gib:.0f} GiB (L={ref['L']} × L²) > {CPU_MEMORY_GIB} GiB RAM"


# ---------------------------------------------------------------------------------------------- GPU
def _backward(fn, grad):
    fn().backward(grad)


def run_gpu(lengths, doc_len):
    import triton

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    roof_name, (peak_flops, _) = gpu_roofline(name)
    rows = []
    for cfg, heads in HEADS.items():
        for L, docs in [(L, d) for L in lengths for d in dict.fromkeys((None, doc_len))]:
            q, keys, values, doc_ids = make_inputs(L, heads, docs, dev, torch.bfloat16)
            flops = useful_flops(L, heads, docs)
            grad = torch.randn(B, heads[0], L, heads[2], device=dev, dtype=torch.bfloat16)
            row = {
                "cfg": cfg,
                "L": L,
                "flops": flops,
                "docs": f"{docs}-token docs" if doc_ids is not None else "1 doc",
            }
            flex_run, row["flex_mask_ms"] = None, None
            try:
                flex_run, build_s = flex_setup(q, keys, values, doc_ids)
                row["flex_mask_ms"] = build_s * 1e3
            except Exception as e:  # noqa: BLE001 - report, don't hide
                row["flex"] = f"failed: {type(e).__name__}"
            methods = {
                "ours": partial(ttt_attention, q, keys, values, doc_ids, backend="triton"),
                "sdpa": partial(sdpa_dense, q, keys, values, doc_ids),
            }
            if flex_run is not None:
                methods["flex"] = partial(flex_run, q, keys, values)
            for m, fn in methods.items():
                try:
                    if L <= 1024:  # hold every method to the reference where the reference is cheap
                        with torch.no_grad():
                            ref = ttt_attention_reference(q, keys, values, doc_ids)
                            torch.testing.assert_close(
                                fn().float(), ref.float(), atol=3e-2, rtol=3e-2
                            )
                        del ref
                    ms = triton.testing.do_bench(
                        partial(_backward, fn, grad), grad_to_none=[q, keys, values]
                    )
                    row[m] = ms
                except torch.cuda.OutOfMemoryError:
                    row[m] = "OOM"
                except Exception as e:  # noqa: BLE001
                    row[m] = f"failed: {type(e).__name__}: {str(e)[:60]}"
                torch.cuda.empty_cache()
                print(f"  {cfg} L={L} {row['docs']} {m}: {row[m]}", flush=True)
            rows.append(row)
    return rows, name, roof_name, peak_flops


def gpu_table(rows, name, roof_name, peak_flops):

    def cell(row, m):
        v = row.get(m)
        if not isinstance(v, float):
            return f"{v} | |"
        tf = row["flops"] / (v * 1e-3) / 1e12
        return f"{v:.3f} | {tf:.0f} ({100 * tf * 1e12 / peak_flops:.0f}%) |"

    def vs(row, m):
        a, b = row.get("ours"), row.get(m)
        return ratio(b, a, 1) if isinstance(a, float) and isinstance(b, float) else "–"

    title = (
        f"### CUDA ({name}, torch {torch.__version__}, bf16; roofline {roof_name} "
        f"{peak_flops / 1e12:.0f} TFLOP/s)"
    )
    lines = [
        f"Forward + backward of one TTT step, B={B}, S={S}; TFLOP/s on the useful FLOPs (see the "
        "bench docstring), % of the roofline in brackets. flex excludes its block-mask build, "
        "shown apart.",
        "",
        "| heads | L | documents | ours ms | ours TFLOP/s | flex ms | flex TFLOP/s "
        "| flex mask build ms | sdpa ms | sdpa TFLOP/s | ours vs flex | ours vs sdpa |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mask_ms = f"{r['flex_mask_ms']:.1f}" if r.get("flex_mask_ms") is not None else "–"
        lines.append(
            f"| {r['cfg']} | {r['L']} | {r['docs']} | {cell(r, 'ours')} {cell(r, 'flex')} "
            f"{mask_ms} | {cell(r, 'sdpa')} {vs(r, 'flex')} | {vs(r, 'sdpa')} |"
        )
    return title, lines


# --------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA comparison (Triton vs flex vs SDPA)")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument(
        "--doc-len",
        type=int,
        default=1024,
        help="length of the packed documents (each L also runs with one document)",
    )
    ap.add_argument(
        "--dense-max-l", type=int, default=4096, help="CPU: largest L to run the dense baseline at"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CPU smoke run: L in {512, 1024}, 256-token documents; printed, not saved",
    )
    args = ap.parse_args()

    if args.quick:
        args.lengths, args.doc_len = "512,1024", 256
    lengths = [int(x) for x in args.lengths.split(",")]
    doc_len = args.doc_len or None
    if args.gpu:
        rows, name, roof_name, peak = run_gpu(lengths, doc_len)
        title, lines = gpu_table(rows, name, roof_name, peak)
        device = "cuda"
    else:
        rows, threads, load = run_cpu(lengths, doc_len, args.dense_max_l)
        strategies = packed_strategies(L=1024) if args.quick else packed_strategies()
        title, lines = cpu_table(rows, threads, doc_len, load, strategies)
        device = "cpu"
    print()
    write_result("ttt_attention", title, lines, device=device, save=not args.quick)


if __name__ == "__main__":
    main()
