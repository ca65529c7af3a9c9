"""Benchmark: the whole EAGLE-3 training step as a user runs it, three ways side by side: specfast
online (the target's forward inside the step), specfast offline (from its shards) and SpecForge
0.2.0 offline (from its per-sample files), at 512-, 2k- and 8k-token rows.

    python bench/train_throughput.py --setup    # once: SpecForge's venv (bench/specforge_side.py)
    python bench/train_throughput.py --quick    # smoke run: 512 only, 1 + 3 steps, not saved
    python bench/train_throughput.py            # 512, 2048, 8192 → bench/results/
    python bench/train_throughput.py --rows 2048 --data sharegpt   # ShareGPT as it comes
    python bench/train_throughput.py --device cuda                 # GPU rows (bf16 hidden states)

Same math on every side: the embedded target (SmolLM2-135M-Instruct), one EAGLE-3 decoder layer
(hidden 576, the target's 9 query / 3 KV heads), the draft vocabulary of `specfast prepare
--draft-vocab-size 16384` (its `vocab.safetensors` `d2t`/`t2d`, given to both), TTT 7 with 0.8^k
step weights, AdamW at lr 3e-4 with grad-norm clip 0.5, fp32 on CPU, the same conversations in
the same order (specfast's batch plan, seed 0).

Per row length N:
1. data: `--data full` (default) takes the ShareGPT conversations that have ≥ N tokens after the
   chat template (in file order), so every row on every side is one conversation of exactly N
   real tokens; `--data sharegpt` takes the first C conversations as they come.
2. `specfast prepare --max-len N --draft-vocab-size 16384 --limit C --heldout 0`;
   `specfast capture --batch-tokens N --dtype float32` (bfloat16 with --device cuda).
3. specfast offline and online: `specfast train --batch-tokens N --ttt-steps 7 --max-steps S
   --warmup-steps 0 ...`; their per-step `tokens` and `tokens_per_s` from RUN/metrics.jsonl.
4. SpecForge: the plan's first S samples written as its offline files, in plan order; its step
   (bench/specforge_side.py) run in its venv.

Measurement. Every side runs in its own process, one after another (never two at once), pinned
to one core with one thread (harness.run_command). A watcher (this script with --_watch, in the
pinned process) starts the trainer, polls its RSS (killing it above the memory cap: an "OOM >
N GiB" cell), its CPU time (/proc/PID/stat) and its metrics lines, and takes the whole process's
peak RSS from wait4's ru_maxrss. tokens/s = non-padding tokens of the measured steps / the sum of
their step times as each trainer times them (the first --warmup steps are dropped).
tok/CPU-s divides the same tokens by the CPU time the process got over those steps; on a shared
machine it is the steadier figure, and the CPU share (CPU time / wall time) says how contended
the core was.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import harness
import specforge_side

SIDES = ("specfast-online", "specfast-offline", "specforge")
# Memory mode, not run by default: offline with --recompute (each TTT step's inputs kept only).
EXTRA_SIDES = ("specfast-offline-recompute",)
TTT = 7
DRAFT_VOCAB = 16384
LR = 3e-4
DEFAULT_STEPS = {512: 16, 2048: 10, 8192: 3}
WORK = Path("~/.cache/specfast-bench/train_throughput").expanduser()
GIB = 2**30


# ------------------------------------------------------------------------------------ watcher
def _proc_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _gpu_mib(pid: int) -> float:
    q = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    )
    for line in q.stdout.splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return float(parts[1])
    return 0.0


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:")) / 2**20


def watch(spec_path: str) -> None:
    """Run spec["cmd"], poll it, write the result JSON (runs pinned, in harness.run_command)."""
    spec = json.loads(Path(spec_path).read_text())
    metrics, cap_kib = Path(spec["metrics"]), int(spec["cap_gib"] * GIB / 1024)
    with open(spec["log"], "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(spec["cmd"], stdout=log, stderr=subprocess.STDOUT)
        samples, killed, gpu_peak, last_gpu = [], False, 0.0, 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter() - t0
            samples.append((now, _proc_cpu_s(proc.pid), _count_lines(metrics)))
            # Over the cap, or the machine itself running low (it is shared): kill it.
            if not killed and (_proc_rss_kib(proc.pid) > cap_kib or _mem_available_gib() < 1.0):
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            if spec.get("cuda") and now - last_gpu > 1.0:
                gpu_peak, last_gpu = max(gpu_peak, _gpu_mib(proc.pid)), now
            time.sleep(0.25)
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "rc": proc.returncode,
        "killed_for_memory": killed,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gib": usage.ru_maxrss * 1024 / GIB,
        "gpu_peak_gib": gpu_peak / 1024 if spec.get("cuda") else None,
        "samples": samples,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def run_watched(cmd, *, metrics: Path, log: Path, cap_gib: float, device: str) -> dict:
    """The command under the watcher, pinned to one core with one thread (CPU) or unpinned."""
    spec = log.with_suffix(".spec.json")
    result = log.with_suffix(".result.json")
    result.unlink(missing_ok=True)
    spec.write_text(
        json.dumps(
            {
                "cmd": [str(c) for c in cmd],
                "metrics": str(metrics),
                "log": str(log),
                "result": str(result),
                "cap_gib": cap_gib,
                "cuda": device == "cuda",
            }
        )
    )
    threads = 1 if device == "cpu" else None
    harness.run_command([sys.executable, __file__, "--_watch", str(spec)], threads=threads)
    if not result.is_file():
        raise RuntimeError(f"watcher failed for {cmd[:4]}; see {log}")
    return json.loads(result.read_text())


# --------------------------------------------------------------------------------------- data
def select_long(n_tokens: int, count: int, out: Path) -> int:
    """The first `count` ShareGPT conversations (file order) with ≥ n_tokens tokens under the
    target's chat template and an assistant token among the first n_tokens, as JSONL."""
    from transformers import AutoTokenizer

    from specfast.data.chat import TemplateError, tokenize_conversation
    from specfast.data.prepare import sharegpt_default_path
    from specfast.data.readers import iter_conversations
    from specfast.targets import resolve_target_path

    tok = AutoTokenizer.from_pretrained(resolve_target_path("smollm2"))
    chosen = []
    for _, messages in iter_conversations(sharegpt_default_path()):
        if sum(len(m["content"]) for m in messages) < 1.5 * n_tokens:
            continue  # too short to reach n_tokens tokens
        try:
            t = tokenize_conversation(tok, messages)
        except TemplateError:
            continue
        if len(t.input_ids) >= n_tokens and t.loss_mask[:n_tokens].any():
            chosen.append(messages)
            if len(chosen) == count:
                break
    out.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chosen))
    return len(chosen)


def sharegpt_count(n_tokens: int, rows: int) -> int:
    """Conversations to prepare so `rows` packed rows of n_tokens fill (mean ShareGPT length
    ~1.4k tokens, cut to n_tokens), with a margin."""
    return math.ceil(1.25 * rows * n_tokens / min(n_tokens, 1400)) + 2


def plan_order(shards: Path, n_tokens: int, count: int) -> list[list[int]]:
    """specfast's offline batches (seed 0) until `count` samples: the order both sides train in."""
    from specfast.data.plan import BatchPlan
    from specfast.shards import ShardDataset

    plan = BatchPlan(ShardDataset(shards).sample_lengths, n_tokens, 0)
    batches, n = [], 0
    while n < count:
        batches.append([int(i) for i in plan.next()])
        n += len(batches[-1])
    return batches


# -------------------------------------------------------------------------------------- sides
def read_steps(metrics: Path) -> tuple[list[dict], str | None]:
    """(per-step {tokens, seconds}, OOM message or None) from a trainer's metrics lines."""
    steps, oom = [], None
    if not metrics.is_file():
        return steps, oom
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "oom" in r:
            oom = r["oom"]
        elif "seconds" in r:
            steps.append({"tokens": r["tokens"], "seconds": r["seconds"]})
        else:  # specfast: tokens and tokens_per_s per step
            steps.append({"tokens": r["tokens"], "seconds": r["tokens"] / r["tokens_per_s"]})
    return steps, oom


def summarize(steps: list[dict], warmup: int, watched: dict) -> dict:
    window = steps[warmup:]
    out = {"steps_done": len(steps), "measured": len(window)}
    if not window:
        return out
    tokens = sum(s["tokens"] for s in window)
    seconds = sum(s["seconds"] for s in window)
    out.update(tokens=tokens, seconds=seconds, tps=tokens / seconds, row=tokens / len(window))
    # CPU over the same steps: from the poll where `warmup` lines existed to the one where all did.
    samples = watched["samples"]
    a = next((s for s in samples if s[2] >= warmup), None)
    b = next((s for s in samples if s[2] >= len(steps)), None)
    if a and b and b[1] > a[1] and b[0] > a[0]:
        out["tok_per_cpu_s"] = tokens / (b[1] - a[1])
        out["cpu_share"] = (b[1] - a[1]) / (b[0] - a[0])
    return out


def specfast_train(data: Path, run: Path, n_tokens: int, total: int, device: str) -> list:
    return [
        sys.executable, "-m", "specfast", "train",
        "--data", data, "--out", run, "--batch-tokens", n_tokens, "--ttt-steps", TTT,
        "--max-steps", total, "--lr", LR, "--warmup-steps", 0, "--device", device,
        "--save-every", 10**9, "--keep-checkpoints", 1, "--no-tensorboard", "--no-progress",
    ]  # fmt: skip


def memory_cap(requested: float) -> float:
    """The requested cap, lowered to leave 1.5 GiB of what the machine has available now."""
    return round(min(requested, _mem_available_gib() - 1.5), 1)


class Timer:
    def __init__(self):
        self.parts: list[tuple[str, str, float, str]] = []

    def run(self, row: str, part: str, note: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        self.parts.append((row, part, time.perf_counter() - t0, note))
        print(f"  [{row}] {part}: {self.parts[-1][2]:.0f} s {note}", flush=True)
        return value

    def made(self, work: Path, row: str, parts: list[str]) -> None:
        """Record how long `parts` (just run) took, for runs that reuse what they made."""
        path = work / "made.json"
        made = json.loads(path.read_text()) if path.is_file() else {}
        made.update({p: [s, n] for r, p, s, n in self.parts if r == row and p in parts})
        path.write_text(json.dumps(made))

    def reused(self, work: Path, row: str, parts: list[str]) -> None:
        path = work / "made.json"
        made = json.loads(path.read_text()) if path.is_file() else {}
        for part in parts:
            seconds, note = made.get(part, [None, ""])
            then = "" if seconds is None else f", made in {seconds:.0f} s {note}"
            self.parts.append((row, part, 0.0, f"reused{then}"))


def bench_row(n_tokens, measured, args, sides, forge_py, timer) -> list[dict]:
    """Everything for one row length; returns one result dict per side."""
    row = f"{n_tokens}"
    total = args.warmup + measured
    work = args.work / f"{args.data}-{n_tokens}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    run = lambda cmd, **kw: harness.run_command(cmd, threads=None, check=True, **kw)  # noqa: E731

    # data
    data, stamp = work / "data", work / "data.stamp.json"
    want = {"data": args.data, "n": n_tokens, "total": total, "conv": args.conversations}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work / "shards", ignore_errors=True)
        prep = [py, "-m", "specfast", "prepare", "--out", data, "--max-len", n_tokens]
        prep += ["--draft-vocab-size", DRAFT_VOCAB, "--heldout", 0, "--no-progress"]
        if args.data == "full":
            count = args.conversations or total
            chosen = timer.run(
                row, "select conversations", "", select_long, n_tokens, count, work / "c.jsonl"
            )
            if chosen == 0:
                raise SystemExit(f"no ShareGPT conversation has {n_tokens} tokens")
            prep += ["--input", work / "c.jsonl"]
        else:
            prep += ["--limit", args.conversations or sharegpt_count(n_tokens, total)]
        timer.run(row, "prepare", "", run, [str(c) for c in prep], capture_output=True)
        stamp.write_text(json.dumps(want))
        (work / "made.json").unlink(missing_ok=True)
        timer.made(work, row, ["select conversations", "prepare"])
    else:
        timer.reused(work, row, ["select conversations"] * (args.data == "full") + ["prepare"])
    meta = json.loads((data / "meta.json").read_text())
    conversations = meta["stats"]["samples"]

    shards = work / "shards"
    if {"specfast-offline", "specfast-offline-recompute", "specforge"} & set(sides):
        manifest = shards / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("complete")):
            cap = [py, "-m", "specfast", "capture", "--data", data, "--out", shards]
            cap += ["--batch-tokens", n_tokens, "--dtype", args.dtype, "--device", args.device]
            cap += ["--no-progress"]
            note = f"({conversations} conversations, {args.dtype})"
            timer.run(row, "capture", note, run, [str(c) for c in cap], capture_output=True)
            timer.made(work, row, ["capture"])
        else:
            timer.reused(work, row, ["capture"])

    results = []
    for side in sides:
        res = {"n": n_tokens, "side": side, "conversations": conversations}
        res["cap"] = memory_cap(args.mem_cap)
        res["tree"] = tree_state()
        metrics = work / side / "metrics.jsonl"
        shutil.rmtree(work / side, ignore_errors=True)
        (work / side).mkdir(parents=True)
        if side == "specforge":
            if forge_py is None:
                results.append({**res, "skipped": "not installed (--setup)"})
                continue
            order = [i for b in plan_order(shards, n_tokens, total) for i in b][:total]
            files = work / side / "files"
            specforge_side.write_vocab_mapping(data, work / side / "vocab.pt")
            note = f"({len(order)} samples)"
            timer.run(
                row, "SpecForge files", note, specforge_side.write_samples, shards, order, files
            )
            cmd = [forge_py, Path(specforge_side.__file__).resolve(), "--files", files]
            cmd += ["--target", target_path(), "--vocab", work / side / "vocab.pt"]
            cmd += ["--max-len", n_tokens, "--ttt", TTT, "--steps", total, "--lr", LR]
            cmd += ["--device", args.device, "--metrics", metrics, "--draft-vocab-size"]
            cmd += [DRAFT_VOCAB, "--mem-cap-gib", res["cap"]]
            if args.specforge_no_compile:
                cmd.append("--no-compile")
        else:
            source = data if side == "specfast-online" else shards
            cmd = specfast_train(source, work / side, n_tokens, total, args.device)
            if side.endswith("-recompute"):
                cmd.append("--recompute")
        load0 = os.getloadavg()[0]
        log = work / f"{side}.log"
        watched = timer.run(
            row, side, f"({total} steps)", run_watched, cmd,
            metrics=metrics, log=log, cap_gib=res["cap"], device=args.device,
        )  # fmt: skip
        steps, oom = read_steps(metrics)
        res.update(summarize(steps, args.warmup, watched))
        res.update(
            peak_rss_gib=watched["peak_rss_gib"],
            gpu_peak_gib=watched["gpu_peak_gib"],
            wall_s=watched["wall_s"],
            load=(load0, os.getloadavg()[0]),
            rc=watched["rc"],
        )
        if watched["killed_for_memory"] or oom or watched["rc"] == specforge_side.OOM_EXIT:
            res["oom"] = True
            res["oom_detail"] = oom or "killed by the watcher (RSS over the cap or machine low)"
        elif watched["rc"] != 0:
            tail = (work / f"{side}.log").read_text().strip().splitlines()[-1:]
            res["error"] = f"rc {watched['rc']}: {tail[0][:120] if tail else ''}"
        print(f"  [{row}] {side}: {short(res)}", flush=True)
        results.append(res)
    return results


def tree_state() -> str:
    """The specfast code a side ran: commit, and whether specfast/, kernels/ or csrc/ differed."""
    git = ["git", "-C", str(harness.ROOT)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        git + ["status", "--porcelain", "--", "specfast", "kernels", "csrc"],
        capture_output=True,
        text=True,
    )
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def target_path() -> str:
    from specfast.targets import resolve_target_path

    return str(resolve_target_path("smollm2"))


def short(r: dict) -> str:
    if r.get("oom"):
        return f"OOM > {r['cap']} GiB after {r.get('steps_done', 0)} steps"
    if "error" in r or "skipped" in r:
        return r.get("error") or r["skipped"]
    return (
        f"{r.get('tps', float('nan')):.1f} tok/s, {r.get('tok_per_cpu_s', float('nan')):.1f} "
        f"tok/CPU-s, peak {r['peak_rss_gib']:.2f} GiB"
    )


# ------------------------------------------------------------------------------------ results
def fmt(x, spec=".1f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_rows(results: list[dict], device: str) -> list[list[str]]:
    rows = []
    forge = {r["n"]: r for r in results if r["side"] == "specforge"}
    for r in results:
        base = forge.get(r["n"], {})
        ok, base_ok = "tps" in r and not r.get("oom"), "tps" in base and not base.get("oom")
        if r.get("oom"):
            cells = [f"OOM > {r['cap']} GiB (step {r.get('steps_done', 0) + 1})"] + ["–"] * 5
            mem = f"> {r['cap']}"
        elif not ok:
            cells = [r.get("error") or r.get("skipped") or "no measured step"] + ["–"] * 5
            mem = fmt(r.get("peak_rss_gib"), ".2f")
        else:
            vs = harness.ratio(r["tps"], base["tps"]) if base_ok and r is not base else "–"
            vs_cpu = (
                harness.ratio(r.get("tok_per_cpu_s"), base.get("tok_per_cpu_s"))
                if base_ok and r is not base
                else "–"
            )
            cells = [
                fmt(r["tps"]),
                vs,
                fmt(r.get("tok_per_cpu_s")),
                vs_cpu,
                fmt(r.get("cpu_share"), ".0%"),
                f"{r['measured']} × {r['row']:.0f}",
            ]
            mem = fmt(r["peak_rss_gib"], ".2f")
        gpu = [fmt(r.get("gpu_peak_gib"), ".2f")] if device == "cuda" else []
        rows.append([str(r["n"]), r["side"], *cells, mem, *gpu])
    return rows


BATCHING = """\
How each side batches (this table: {mode}). specfast packs whole conversations, in its seeded
plan order, into one row of at most N tokens with document boundaries (positions and attention
restart at each conversation) and no padding; a conversation longer than N is cut to N.
SpecForge 0.2.0 offline takes one sample per step (batch size 1, as here; its
`DataCollatorWithPadding` pads a batch to its longest sample with zeros, and those pad positions
go through every layer, masked only in attention and loss), each cut to `max_length` N, so its
row is as long as the sample.
With `--data full` every conversation has at least N tokens, so all three sides train on
identical rows of exactly N real tokens, one conversation per row: no packing, no padding, same
tokens per step. The ratio is then the cost of the training step itself at equal row length.
On ShareGPT as it comes (`--data sharegpt`) specfast packs whole conversations in plan order
while they fit (greedy, none split) and SpecForge takes them one by one: where conversations are
long next to N (ShareGPT's median is ~1.5k tokens) both train on the same rows, where they are
short specfast's rows hold several and more tokens per step, while a larger SpecForge batch
would add padding. tokens/s count real tokens on every side; the "measured steps × tokens"
column gives the mean per step."""

MODES = {
    "full": "`--data full`, identical rows of N real tokens on every side",
    "sharegpt": "`--data sharegpt`, the first ShareGPT conversations as they come",
}

MATH = """\
Same on both sides: target SmolLM2-135M-Instruct (aux layers 1, 14, 26; final hidden state after
the target's norm), draft `LlamaForCausalLMEagle3` of one decoder layer with identical tensors
(14.53 M trainable parameters, embedding frozen from the target), draft vocabulary and d2t/t2d
from specfast's `vocab.safetensors`, teacher = softmax of the target's logits over the draft
vocabulary, supervised only where the target's full-vocabulary argmax is in the draft
vocabulary, TTT 7 with loss Σ 0.8^k · loss_k, AdamW lr 3e-4, weight decay 0, grad-norm clip 0.5,
cosine decay without warm-up (to 0.1 · lr in specfast, to 0 in SpecForge), fp32, hidden states
stored in fp32 (SpecForge's own capture would store the target's dtype, but its fp32 model does
not cast bf16 inputs). Differences:
- Supervised positions: specfast supervises step k at row position t when token t+2+k (the one
  predicted) is an assistant token and in the same conversation; SpecForge when token t+k is an
  assistant token (its loss mask is not shifted with the prediction), and it zeroes the mask of
  each sample's last token. The sets differ by two tokens at each answer's edges; the work per
  step does not depend on them.
- Loss normalisation: specfast divides loss_k by its number of supervised positions, SpecForge
  by all positions (B·T). Same gradients up to a per-step scale.
- Teacher: SpecForge multiplies the stored final hidden state by the full 49,152-row head every
  step (it needs the full-vocabulary argmax); specfast offline uses the 16,384 draft rows and the
  argmax stored at capture; specfast online runs the whole target (30 layers) inside the step.
- Attention: SpecForge's `sdpa` backend (its only one with a CPU backward) builds fp32 scores
  [9, L, L + k] per TTT step and keeps them for backward (memory quadratic in L); specfast's
  fused TTT attention (causal + k diagonals, per conversation) keeps O(L).
- Optimizer: SpecForge's `BF16Optimizer` keeps fp32 master copies even of fp32 weights (one
  more copy and copy-back per step); AdamW betas (0.9, 0.999) there, (0.9, 0.95) in specfast.
- Extra work in SpecForge's step: its acceptance-rate metric (a softmax over the draft logits
  per TTT step, no grad); `torch.compile` of its loss and teacher (compiled in warm-up).
- Data loading is inside the step on both sides: specfast's C++ shard reader (threads, ahead);
  SpecForge's `FeatureDataLoader` (torch.load(mmap) + clone per sample, 4 prefetch threads)."""

PATCHES = """\
SpecForge on CPU (bench/specforge_side.py; applied at run time, site-packages untouched): its
Triton `LogSoftmaxLoss` is replaced by its own PyTorch reference `specforge.core.loss.
_compute_loss` (same loss and gradient); its `TargetHead` is built directly with the target's
tied embedding as `fc` and kept in fp32 (`from_pretrained` wants a `*.index.json` and casts to
bf16); its `Trainer`'s FSDP backend is replaced by a one-process backend (backward, then
`BF16Optimizer.step`), everything else is SpecForge's own classes: draft config generated from
the target by its EAGLE-3 provider, `OnlineEagle3Model`, `Eagle3TrainStrategy`, `TrainerCore`,
`FeatureDataLoader` with its offline normalizer and collator."""


def report(saved: dict) -> list[str]:
    results, device = saved["results"], saved["device"]
    cols = [
        "row", "side", "tok/s", "vs SpecForge", "tok/CPU-s", "vs SpecForge (CPU)",
        "CPU share", "measured steps × tokens", "peak RSS (GiB)",
    ]  # fmt: skip
    if device == "cuda":
        cols.append("peak GPU (GiB)")
    loads = [x for r in results for x in r.get("load", ())]
    trees = {r["tree"] for r in results if r["side"] != "specforge" and "tree" in r}
    data = "Identical full rows" if saved["data"] == "full" else "ShareGPT as it comes"
    return [
        f"{data}, TTT {TTT}, draft vocabulary {DRAFT_VOCAB}, "
        f"{'fp32' if device == 'cpu' else 'bf16'}, {saved['warmup']} warm-up steps dropped per "
        f"side{'; specfast at commit ' + ', '.join(sorted(trees)) if trees else ''}. Each "
        "side in its own process, one after another (never two at once), pinned to one core "
        "with one thread. 1-min load average "
        f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f} during the runs: the 2 cores "
        "are shared with other work, so wall-clock tok/s carry the contention (CPU share = CPU "
        "time the trainer got / wall time over the measured steps) and tok/CPU-s much less of "
        "it; treat both as rough. Ratio = specfast / SpecForge: above 1, specfast is faster. "
        "Peak RSS: the whole trainer process (wait4 ru_maxrss), i.e. interpreter, torch, "
        "models, data and the step; OOM: SpecForge ran past the cap (address-space limit set "
        "at the cap, or RSS over it) and was stopped.",
        "",
        *harness.table(cols, table_rows(results, device)),
        "",
        BATCHING.format(mode=MODES[saved["data"]]),
        "",
        *run_notes(saved),
        MATH,
        "",
        PATCHES,
        "",
        "Time of each part of this run, to rerun it after a change (prepared data and shards "
        "are reused from the work folder unless `--fresh`; select, prepare and capture then "
        "drop out):",
        "",
        *harness.table(
            ["row", "part", "seconds", "note"],
            [[r, p, f"{s:.0f}", n] for r, p, s, n in saved["parts"]]
            + [["all", "total", f"{saved['total_s']:.0f}", ""]],
        ),
    ]


def run_notes(saved: dict) -> list[str]:
    """What this run's data and failures were, from its results."""
    notes, results = [], saved["results"]
    for n in sorted({r["n"] for r in results}):
        r = next(x for x in results if x["n"] == n)
        total = saved["warmup"] + max(x.get("measured", 0) for x in results if x["n"] == n)
        if saved["data"] == "full" and r["conversations"] < total:
            notes.append(
                f"- {n}: only {r['conversations']} ShareGPT conversations have {n} tokens with an "
                f"answer among them; the {total} steps cycle over them (specfast's plan reshuffles "
                "each epoch; SpecForge's files follow the same order)."
            )
        elif saved["data"] == "sharegpt":
            notes.append(f"- {n}: the first {r['conversations']} ShareGPT conversations.")
    for r in results:
        detail = r.get("oom_detail") or _oom_line(saved, r)
        if r.get("oom") and detail:
            step = r.get("steps_done", 0) + 1
            notes.append(f"- {r['n']} {r['side']}: stopped in step {step}: {detail}")
    if any(r.get("oom") and r["side"] == "specforge" for r in results):
        notes.append(
            "- SpecForge's `sdpa` attention keeps fp32 scores [9, L, L + k] for every TTT step "
            f"k: {9 * 8192 * 8192 * 4 / 1e9:.1f} GB each at L = 8,192."
        )
    return ["This run:", "", *notes, ""] if notes else []


def _oom_line(saved: dict, r: dict) -> str | None:
    """The OOM message a SpecForge run left in its metrics (for results saved without it)."""
    work = Path(saved.get("work", WORK)) / f"{saved['data']}-{r['n']}"
    path = work / r["side"] / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if '"oom"' in line:
            return json.loads(line)["oom"]
    return None


def write_report(saved: dict, save: bool) -> None:
    title = f"# Training step throughput: specfast vs SpecForge 0.2.0 ({saved['device'].upper()})"
    harness.write_result(
        saved["name"], title, report(saved), device=saved["device"], command=saved["command"],
        save=save,
    )  # fmt: skip


# --------------------------------------------------------------------------------------- main
def parse_steps(text: str, rows: list[int]) -> dict[int, int]:
    if "=" not in text:
        return {n: int(text) for n in rows}
    given = {int(k): int(v) for k, v in (p.split("=") for p in text.split(","))}
    return {n: given.get(n, DEFAULT_STEPS.get(n, 8)) for n in rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="512,2048,8192", help="row lengths in tokens")
    p.add_argument(
        "--steps",
        default=",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()),
        help="measured steps per side: N, or ROW=N,ROW=N",
    )
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    p.add_argument("--data", choices=("full", "sharegpt"), default="full")
    p.add_argument("--conversations", type=int, default=0, help="conversations to prepare")
    p.add_argument(
        "--sides", default=",".join(SIDES), help=f"any of {','.join(SIDES + EXTRA_SIDES)}"
    )
    p.add_argument("--tag", default="", help="suffix of the result's name (a run of other rows)")
    p.add_argument("--mem-cap", type=float, default=20.0, help="GiB of RSS per process")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--work", type=Path, default=WORK, help="data, shards, runs and logs")
    p.add_argument("--fresh", action="store_true", help="prepare and capture again")
    p.add_argument("--specforge-no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 only, 1 + 3 steps")
    p.add_argument("--setup", action="store_true", help="make SpecForge's venv first")
    p.add_argument("--no-save", action="store_true")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the table from the last run's JSON"
    )
    p.add_argument("--_watch", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._watch:
        watch(args._watch)
        return 0
    if args.quick:
        args.rows, args.steps, args.warmup, args.no_save = "512", "3", 1, True
        args.work = args.work / "quick"  # its own data: the full run's stays reusable
    rows = [int(x) for x in args.rows.split(",")]
    steps = parse_steps(args.steps, rows)
    sides = [s for s in args.sides.split(",") if s]
    if bad := set(sides) - set(SIDES + EXTRA_SIDES):
        p.error(f"unknown sides {sorted(bad)}")
    args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.setup:
        specforge_side.setup()
    forge_py = specforge_side.venv_python() if "specforge" in sides else None
    if "specforge" in sides and forge_py is None:
        print(specforge_side.SETUP_HINT + "; running the specfast sides only", flush=True)
    name = "train_throughput" + ("" if args.data == "full" else "-sharegpt")
    name += f"-{args.tag}" if args.tag else ""
    saved_path = args.work / f"{name}-{args.device}.json"
    if args.report_only:
        write_report(json.loads(saved_path.read_text()), save=not args.no_save)
        return 0
    started, timer, results = time.perf_counter(), Timer(), []
    for n in rows:
        print(f"row {n}: {args.warmup} + {steps[n]} steps per side", flush=True)
        results += bench_row(n, steps[n], args, sides, forge_py, timer)
    saved = {
        "name": name,
        "command": harness.command_line(),
        "device": args.device,
        "data": args.data,
        "work": str(args.work),
        "warmup": args.warmup,
        "results": results,
        "parts": timer.parts,
        "total_s": time.perf_counter() - started,
    }
    args.work.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(saved, indent=1))
    write_report(saved, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
