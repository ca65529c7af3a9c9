"""`specfast demo`: the whole path on the embedded defaults — SmolLM2-135M-Instruct as the target,
ShareGPT V3 as the data — sized for ~10 minutes on 2 CPU cores: prepare, train, export, summarise."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("specfast")

# Sized for 2 CPU cores: short rows and few TTT steps buy more optimizer steps in the time budget.
DEMO_TRAIN = dict(ttt_steps=4, batch_tokens=1024, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, save_every=50)


def run_demo(out: str | Path, minutes: float = 6.0, conversations: int = 3000, target: str = "smollm2",
             device: str = "auto") -> dict:
    from transformers import AutoTokenizer

    from specfast.data.prepare import prepare, sharegpt_default_path
    from specfast.export import export_draft
    from specfast.targets import resolve_target_path
    from specfast.train.config import TrainConfig
    from specfast.train.trainer import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    log.info("[1/4] target %s", target)
    target_path = resolve_target_path(target)

    log.info("[2/4] prepare: %d ShareGPT conversations (+64 held out)", conversations)
    tok = AutoTokenizer.from_pretrained(target_path)
    stats = prepare([sharegpt_default_path()], out / "data", tok, target, limit=conversations, heldout=64,
                    max_len=1024)

    log.info("[3/4] train for %.1f minutes", minutes)
    cfg = TrainConfig(data=str(out / "data"), target=target, out=str(out / "run"), device=device,
                      max_minutes=minutes, max_steps=100_000, **DEMO_TRAIN)
    summary = train(cfg)

    log.info("[4/4] export")
    export = export_draft(out / "run", out / "export", extra={"target": target})

    result = {
        "samples": stats.samples,
        "tokens": stats.tokens,
        "supervised_tokens": stats.supervised_tokens,
        "train_steps": summary["steps"],
        "train_tokens": summary["tokens"],
        "train_tokens_per_s": summary["tokens_per_s"],
        "acc_per_step": [round(a, 4) for a in summary.get("recent_acc", [])],
        "sim_accept_len": round(summary.get("recent_sim_accept_len", 1.0), 3),
        "export": str(export),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2))
    print_summary(result)
    return result


def print_summary(r: dict) -> None:
    rows = [
        ("training samples", f"{r['samples']:,}"),
        ("tokens prepared (supervised)", f"{r['tokens']:,} ({r['supervised_tokens']:,})"),
        ("train steps / tokens", f"{r['train_steps']:,} / {r['train_tokens']:,}"),
        ("training tokens/s", f"{r['train_tokens_per_s']:.1f}"),
        ("accuracy per TTT step", " ".join(f"{a:.3f}" for a in r["acc_per_step"])),
        ("simulated acceptance length", f"{r['sim_accept_len']:.3f}"),
    ]
    for key in ("measured_accept_len", "speedup"):
        if key in r:
            rows.append((key.replace("_", " "), f"{r[key]:.3f}"))
    rows += [("export", r["export"]), ("wall time", f"{r['wall_seconds']:.0f} s")]
    width = max(len(k) for k, _ in rows)
    print("\nspecfast demo summary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
