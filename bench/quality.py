"""Benchmark: draft quality per CPU budget. Each training recipe is trained for the same minutes on
the same data, then its export is measured by real speculative decoding (`specfast eval`, greedy)
on held-out prompts at K=3 and K=5. One table: τ per recipe and its ratio to today's defaults,
training tokens/s, steps and the final per-step accuracies.

    python bench/quality.py --quick                      # smoke run: tiny budget, not saved
    python bench/quality.py --minutes 30 --jobs 2   # → bench/results/quality-30min-<machine>.md
    python bench/quality.py --variants defaults,all --onpolicy-data DIR

Method. `specfast prepare` of the first --conversations ShareGPT conversations (plus --heldout
held out; the data folder is reused across runs), then for each variant, one after another, each
pinned to one core with one thread (bench/harness.run_command):
    specfast train --max-minutes M --batch-tokens B ... <variant flags>
    specfast export RUN --out RUN/export
    specfast eval --draft RUN/export -k 3 (and -k 5) --no-baseline --threads 1
The prompts are the held-out conversations' first user turns cut to 1000 characters (as
`specfast demo` measures), answered up to --max-new-tokens. `defaults` pins today's recipe
explicitly (lr 3e-4, 50 warmup steps of the old schedule, TTT 7, fc std 0.02), so it stays today's
whatever the defaults become.

A variant whose settings the trainer does not act on yet (no call of the building block or read of
the field outside the modules that define them: WIRING) is listed as "not wired" instead of
silently training as the defaults.
On-policy data: a prepared folder whose answers the target regenerated (`specfast prepare
--regenerate[-url]`), given with --onpolicy-data. None of its conversations may be one of the
held-out prompts: with the same --heldout, any --limit up to --conversations does (the first N
conversations; the cached variant trains on only 15 per minute of budget), e.g. for 30 minutes
    specfast prepare --out DIR --limit 500 --heldout 64 --max-len 512 --regenerate
(--max-len 512: the rows are 512 tokens, so nothing past them is generated; ~30 min on 2 cores;
measured in bench/results/quality-30min-onpolicy-*.md).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

WORK = Path.home() / ".cache" / "specfast-bench" / "quality"

# Today's defaults, pinned, and the fixes of issue 11 one at a time and together.
BASE = [
    "--lr", "3e-4", "--warmup-steps", "50", "--ttt-steps", "7", "--min-lr-ratio", "0.1",
    "--lr-schedule", "steps", "--fc-init", "normal", "--precision", "fp32",
]  # fmt: skip
# The demo's recipe on today's trainer (schedule by budget fraction, fc scaled to the aux RMS).
DEMO = [
    "--lr", "1e-3", "--ttt-steps", "4", "--lr-schedule", "fraction", "--warmup", "0.05",
    "--fc-init", "aux_rms",
]  # fmt: skip
OLD_DEMO = ["--lr", "1e-3", "--ttt-steps", "4", "--warmup-steps", "10"]  # before issue 11
FIXES = {
    "fc_init": ["--fc-init", "aux_rms"],
    "schedule": ["--lr-schedule", "fraction", "--warmup", "0.05"],
    "lr": ["--lr", "1e-3"],
    "ttt4": ["--ttt-steps", "4"],
}
# name -> (flags after BASE, config fields whose effect the variant measures, data: base|onpolicy)
VARIANTS = {
    "defaults": ([], [], "base"),
    "demo-recipe": (OLD_DEMO, [], "base"),
    "bf16": (["--precision", "bf16"], ["precision"], "base"),
    "demo": (DEMO, ["fc_init", "lr_schedule", "warmup"], "base"),
    "demo-bf16": (DEMO + ["--precision", "bf16"], ["precision"], "base"),
    "demo-bf16-ttt2": (DEMO + ["--precision", "bf16", "--ttt-steps", "2"], ["precision"], "base"),
    "demo-bf16-ttt1": (DEMO + ["--precision", "bf16", "--ttt-steps", "1"], ["precision"], "base"),
    "demo-bf16+on-policy": (DEMO + ["--precision", "bf16"], ["precision"], "onpolicy"),
    "demo-bf16-ttt2+init": (
        DEMO + ["--precision", "bf16", "--ttt-steps", "2", "--init-from-target"],
        ["precision"],
        "base",
    ),
    "fc-init": (FIXES["fc_init"], ["fc_init"], "base"),
    "schedule": (FIXES["schedule"], ["lr_schedule", "warmup"], "base"),
    "lr-1e-3": (FIXES["lr"], [], "base"),
    "ttt-4": (FIXES["ttt4"], [], "base"),
    "ttt-3": (["--ttt-steps", "3"], [], "base"),
    "init-from-target": (["--init-from-target"], [], "base"),
    "all": (sum(FIXES.values(), []), ["fc_init", "lr_schedule", "warmup"], "base"),
    "all+on-policy": (sum(FIXES.values(), []), ["fc_init", "lr_schedule", "warmup"], "onpolicy"),
}
# The cached variant's distinct samples grow with the budget, `{samples}` in its flags: 15 per
# minute of one core at 512-token rows, about six epochs (measured at 10 minutes: 150 samples
# beat 80, which overfit, and 250, which gained nothing over no cache).
SAMPLES_PER_MINUTE, SAMPLES_PER_STEP = 15, 0.16
VARIANTS["demo-bf16-ttt2+init+cache"] = (
    VARIANTS["demo-bf16-ttt2+init"][0] + ["--target-cache-gb", "8", "--max-samples", "{samples}"],
    ["precision"],
    "base",
)
VARIANTS["demo-bf16-ttt2+init+cache+on-policy"] = (
    VARIANTS["demo-bf16-ttt2+init+cache"][0],
    ["precision"],
    "onpolicy",
)
QUICK_VARIANTS = ["defaults", "demo-recipe", "fc-init", "schedule", "all", "all+on-policy"]


# What the trainer must do for a variant's flags to take effect, as a pattern in its code.
WIRING = {
    "fc_init": r"\binit_fc\(|\bcfg\.fc_init\b",
    "lr_schedule": r"\bSchedule\.from_config\(|\bcfg\.lr_schedule\b",
    "warmup": r"\bSchedule\.from_config\(|\bcfg\.warmup\b",
    "precision": r"\bcfg\.precision\b",
}
# The modules that define these settings and building blocks (their use of them proves nothing).
DEFINERS = {"train/config.py", "train/schedule.py", "model/init.py", "train/live_eval.py"}


def unwired(fields: list[str]) -> list[str]:
    """The settings among `fields` that the trainer does not act on yet: flags that would parse
    and then change nothing."""
    src = harness.ROOT / "specfast"
    text = "\n".join(
        p.read_text() for p in src.rglob("*.py") if p.relative_to(src).as_posix() not in DEFINERS
    )
    return [f for f in fields if not re.search(WIRING[f], text)]


def specfast(*args: str, log: Path, core: int | None = None, timeout: float | None = None) -> None:
    cmd = [sys.executable, "-m", "specfast", *args]
    cores = None if core is None else [core]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        res = harness.run_command(cmd, threads=1, cores=cores, stdout=f, stderr=f, timeout=timeout)
    if res.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:]
        raise harness.ChildError(" ".join(args[:1]), tail[0] if tail else f"rc={res.returncode}")


def prepare_data(work: Path, conversations: int, heldout: int) -> Path:
    data = work / f"data-{conversations}-{heldout}"
    if not (data / "meta.json").is_file():  # written last: a complete folder is reused
        shutil.rmtree(data, ignore_errors=True)
        specfast(
            "prepare", "--out", str(data), "--limit", str(conversations),
            "--heldout", str(heldout), "--max-len", "2048", "--no-progress",
            log=work / "prepare.log",
        )  # fmt: skip
    return data


def check_onpolicy(onpolicy: Path, base: Path) -> None:
    """The on-policy folder is regenerated data that holds none of the held-out conversations."""
    log = onpolicy / "regenerated.jsonl"
    if not (onpolicy / "meta.json").is_file() or not log.is_file():
        raise SystemExit(f"--onpolicy-data {onpolicy}: not a folder of `prepare --regenerate`")
    held = {json.loads(ln)["source"] for ln in (base / "heldout.jsonl").read_text().splitlines()}
    trained = {json.loads(ln)["source"] for ln in log.read_text().splitlines()}
    if held & trained:
        raise SystemExit(
            f"--onpolicy-data {onpolicy}: {len(held & trained)} of its conversations are held-out "
            f"prompts of {base} (e.g. {sorted(held & trained)[0]}); prepare it with a --limit "
            "no larger than --conversations and the same --heldout"
        )


def eval_prompts(data: Path, out: Path) -> Path:
    """First user turns of the held-out conversations, cut to 1000 characters (as the demo)."""
    from specfast.eval.prompts import read_prompts

    lines = [
        json.dumps({"turns": [p.turns[0][:1000]]}) for p in read_prompts(data / "heldout.jsonl")
    ]
    out.write_text("\n".join(lines) + "\n")
    return out


def variant_flags(name: str, a) -> list[str]:
    samples = round(a.steps * SAMPLES_PER_STEP if a.steps else a.minutes * SAMPLES_PER_MINUTE)
    return [f.replace("{samples}", str(max(samples, 1))) for f in VARIANTS[name][0]]


def run_variant(
    name: str, flags: list[str], data: Path, prompts: Path, a, work: Path, core: int | None
) -> dict:
    run = work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    log = run / "log.txt"
    t0 = time.time()
    budget = ["--max-steps", str(a.steps)] if a.steps else ["--max-minutes", str(a.minutes)]
    budget += [] if a.steps else ["--max-steps", "1000000"]
    specfast(
        "train", "--data", str(data), "--out", str(run), *budget,
        "--save-every", "1000000", "--batch-tokens", str(a.batch_tokens),
        "--device", "cpu", "--no-progress", "--no-tensorboard", *BASE, *flags,
        log=log, core=core,
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    specfast("export", str(run), "--out", str(run / "export"), log=log, core=core)
    taus = {}
    for k in a.k:
        out = run / f"eval-k{k}.json"
        specfast(
            "eval", "--draft", str(run / "export"), "--prompts", str(prompts), "-k", str(k),
            "--limit", str(a.prompts), "--max-new-tokens", str(a.max_new_tokens),
            "--no-baseline", "--threads", "1", "--no-progress", "--out", str(out),
            log=log, core=core,
        )  # fmt: skip
        taus[k] = json.loads(out.read_text())["acceptance_length"]
    return {
        "variant": name,
        "flags": " ".join(flags),
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "acc": summary.get("recent_acc"),
        "sim_tau": summary.get("recent_sim_accept_len"),
        "tau": taus,
        "wall_s": round(time.time() - t0, 1),
    }


def report(results: list[dict], a) -> list[str]:
    base = next((r for r in results if r["variant"] == "defaults" and "tau" in r), None)
    cols = ["variant", "flags (beyond defaults)", "steps", "tok/s", "acc per TTT step", "sim τ"]
    cols += [f"τ K={k}" for k in a.k] + [f"vs defaults K={a.k[0]}"]
    rows = []
    for r in results:
        if "tau" not in r:
            rows.append([r["variant"], r.get("flags", ""), "", "", "", ""] + [""] * len(a.k)
                        + [r["note"]])  # fmt: skip
            continue
        acc = " ".join(f"{x:.2f}" for x in (r["acc"] or []))
        k0 = a.k[0]
        vs = f"{r['tau'][k0] / base['tau'][k0]:.3f}×" if base else "–"
        rows.append(
            [r["variant"], r["flags"] or "–", r["steps"], f"{r['tokens_per_s']:.0f}", acc,
             f"{r['sim_tau']:.3f}" if r["sim_tau"] else "–"]
            + [f"{r['tau'][k]:.3f}" for k in a.k] + [vs]
        )  # fmt: skip
    return harness.table(cols, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per variant")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="a fixed number of optimizer steps per variant instead of --minutes: robust to a "
        "shared machine, but it compares quality per step, not per CPU minute",
    )
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=64)
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts evaluated")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=512)
    p.add_argument("--k", type=lambda s: [int(x) for x in s.split(",")], default=[3, 5])
    p.add_argument("--variants", help=f"comma-separated, of: {', '.join(VARIANTS)} (default all)")
    p.add_argument("--onpolicy-data", help="a prepared folder of target-regenerated answers")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants trained at once, each on a core of its own (default 1: one after another; "
        "at once they share memory bandwidth, so tokens/s drop a little for each)",
    )
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budget, not saved")
    a = p.parse_args(argv)
    if a.quick:
        a.minutes, a.conversations, a.heldout, a.prompts, a.max_new_tokens = 0.5, 120, 8, 3, 32
        a.work = a.work / "quick"
    names = a.variants.split(",") if a.variants else (QUICK_VARIANTS if a.quick else list(VARIANTS))
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    cores = len(os.sched_getaffinity(0))
    if not 1 <= a.jobs <= cores:
        p.error(f"--jobs must be between 1 and the {cores} usable cores, not {a.jobs}")
    a.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(a.work, a.conversations, a.heldout)
    prompts = eval_prompts(data, a.work / "prompts.jsonl")
    datasets = {"base": data, "onpolicy": Path(a.onpolicy_data) if a.onpolicy_data else None}
    if datasets["onpolicy"] is not None:
        check_onpolicy(datasets["onpolicy"], data)

    # Each variant runs on a core of its own; with --jobs N, N of them at once.
    free = queue.Queue()
    for core in harness.pinned_cores(a.jobs):
        free.put(core)

    def one(name: str) -> dict:
        _, fields, which = VARIANTS[name]
        missing = unwired(fields)
        flags = variant_flags(name, a)
        entry = {"variant": name, "flags": " ".join(flags)}
        if missing:
            entry["note"] = f"not wired: the trainer does not read {', '.join(missing)} yet"
        elif datasets[which] is None:
            entry["note"] = "no on-policy data: pass --onpolicy-data (prepare --regenerate[-url])"
        else:
            core = free.get()
            print(f"[{name}] training {a.minutes} min on core {core} ...", flush=True)
            try:
                entry = run_variant(name, flags, datasets[which], prompts, a, a.work, core)
            except harness.ChildError as e:
                entry["note"] = f"failed: {e}"
            finally:
                free.put(core)
        print(json.dumps(entry), flush=True)
        return entry

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        results = list(pool.map(one, names))
    (a.work / "results.json").write_text(json.dumps(results, indent=2))

    budget = f"{a.steps} optimizer steps" if a.steps else f"{a.minutes:g} min of training"
    at_once = f", {a.jobs} variants at a time" if a.jobs > 1 else ""
    body = [
        f"Each variant: {budget} on one core (one thread{at_once}), "
        f"{a.conversations} ShareGPT conversations, {a.batch_tokens}-token rows; τ by real "
        f"speculative decoding (greedy) of {a.prompts} held-out first turns, up to "
        f"{a.max_new_tokens} new tokens. `defaults` = {' '.join(BASE)}.",
        "",
        *report(results, a),
    ]
    tag = f"{a.steps}steps" if a.steps else f"{a.minutes:g}min"
    harness.write_result(
        f"quality-{tag}",
        "# Draft quality per CPU budget (bench/quality.py)",
        body,
        save=not a.quick,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
