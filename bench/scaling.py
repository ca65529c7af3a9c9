"""Benchmark: training tokens/s on 1, 2, ... ranks under torchrun, at the same per-rank batch, and
the scaling efficiency of each added rank.

    python bench/scaling.py                  # CPU: 1 and 2 processes, gloo, each on its own core
    python bench/scaling.py --quick          # smoke run: fewer steps, not saved
    python bench/scaling.py --device cuda --ranks 1,2,4,8   # GPU rows: NCCL, one GPU per rank

What runs: the embedded target (SmolLM2-135M-Instruct) and its EAGLE-3 draft, offline (from shards
captured once, so the numbers are the draft's training step and not the target's forward) or
`--mode online`. Each case is `torchrun --standalone --nproc_per_node N -m specfast train ...`
with `--grad-accum 1` and the same `--batch-tokens` per rank, `--parallel ddp` (or `--parallel`),
so N ranks train N times the tokens per step. On CPU, rank r runs pinned to its own core with one
thread (this script, `--_rank`, sets the affinity, then runs the specfast CLI), and the cases run
one after another, never two at once.

tokens/s of a case = the global tokens of its measured steps (from RUN/metrics.jsonl, where every
step's tokens cover all ranks) / the sum of their step times (each step timed by its slowest rank);
the first `--warmup` steps are dropped. Efficiency of N ranks = tokens/s(N) / (N · tokens/s(1)).
The load average before and after is printed with the table: on a shared machine it says how far
to trust it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

WORK = Path("~/.cache/specfast-bench/scaling").expanduser()


def rank_main(argv: list[str]) -> int:
    """One rank: pinned to its own core (the LOCAL_RANK-th of the cores given), one thread."""
    cores = [int(c) for c in os.environ["SCALING_CORES"].split(",")]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    os.sched_setaffinity(0, [cores[local % len(cores)]])
    import torch

    torch.set_num_threads(1)
    from specfast.cli import main

    return main(argv)


def prepare(work: Path, args) -> Path:
    """Prepared conversations and (offline) their shards, made once and reused."""
    py = sys.executable
    data = work / f"data-{args.conversations}-{args.batch_tokens}"
    if not (data / "meta.json").is_file():
        cmd = [py, "-m", "specfast", "prepare", "--out", data, "--max-len", args.batch_tokens]
        cmd += ["--limit", args.conversations, "--heldout", "0", "--no-progress"]
        subprocess.run([str(c) for c in cmd], check=True)
    if args.mode == "online":
        return data
    shards = work / f"shards-{args.conversations}-{args.batch_tokens}-{args.device}"
    if not (shards / "manifest.json").is_file():
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        cmd = [py, "-m", "specfast", "capture", "--data", data, "--out", shards, "--dtype", dtype]
        cmd += ["--batch-tokens", args.batch_tokens, "--device", args.device, "--no-progress"]
        subprocess.run([str(c) for c in cmd], check=True)
    return shards


def run_case(n: int, data: Path, work: Path, args) -> dict:
    out = work / f"run-{args.mode}-{args.device}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    train = ["train", "--data", data, "--out", out, "--max-steps", args.steps, "--device"]
    train += [args.device, "--batch-tokens", args.batch_tokens, "--ttt-steps", args.ttt_steps]
    train += ["--grad-accum", "1", "--parallel", args.parallel, "--save-every", 10**6]
    train += ["--no-progress", "--no-tensorboard"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n]
    env = dict(os.environ)
    if args.device == "cpu":
        cores = sorted(os.sched_getaffinity(0))
        if n > len(cores):
            raise SystemExit(f"{n} ranks need {n} cores, this process may use {len(cores)}")
        env.update(harness.thread_env(1), SCALING_CORES=",".join(map(str, cores[-n:])))
        cmd += [__file__, "--_rank"]
    else:
        cmd += ["-m", "specfast"]
    r = subprocess.run([str(c) for c in cmd + train], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{n} rank(s) failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[args.warmup :]
    tokens = sum(x["tokens"] for x in rows)
    seconds = sum(x["tokens"] / x["tokens_per_s"] for x in rows)
    return {"ranks": n, "steps": len(rows), "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    p.add_argument("--ranks", default="1,2", help="comma-separated numbers of ranks (default 1,2)")
    p.add_argument("--mode", choices=["offline", "online"], default="offline")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], default="ddp")
    p.add_argument("--batch-tokens", type=int, default=1024, help="per rank per step")
    p.add_argument("--ttt-steps", type=int, default=7)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps not measured")
    p.add_argument("--conversations", type=int, default=400)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--quick", action="store_true", help="4 measured steps, 512 tokens; not saved")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch_tokens, args.conversations = 5, 1, 512, 64
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work, args)
    load_before = os.getloadavg()
    results = [run_case(int(n), data, args.work, args) for n in args.ranks.split(",")]
    load_after = os.getloadavg()
    base = next((r["tokens_per_s"] for r in results if r["ranks"] == 1), None)
    rows = []
    for r in results:
        speedup = r["tokens_per_s"] / base if base else None
        eff = f"{speedup / r['ranks']:.0%}" if speedup else "–"
        rows.append(
            (
                r["ranks"],
                f"{r['tokens_per_s']:.0f}",
                f"{speedup:.2f}×" if speedup else "–",
                eff,
                r["steps"],
                r["tokens"],
            )
        )
    body = harness.table(
        ["ranks", "tokens/s", "vs 1 rank", "efficiency", "steps measured", "tokens"], rows
    )
    placing = "each rank pinned to its own core, 1 thread" if args.device == "cpu" else "1 GPU/rank"
    body += [
        "",
        f"{args.mode}, {args.parallel}, {args.batch_tokens} tokens per rank per step, TTT "
        f"{args.ttt_steps}, {placing}; load average (1 min) {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after.",
    ]
    harness.write_result(
        f"scaling-{args.mode}",
        f"# Scaling over ranks ({args.device}, torchrun)",
        body,
        device=args.device,
        save=not args.quick,
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_rank":
        sys.exit(rank_main(sys.argv[2:]))
    main()
