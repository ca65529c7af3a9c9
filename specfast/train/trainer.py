"""`specfast train`: the loop that ties data, target, draft, TTT unroll, optimizer, checkpoints and
metrics together. Online mode: the target runs inside each step."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from specfast.data.prepared import PreparedData
from specfast.device import resolve_device
from specfast.model.load import new_draft
from specfast.pipeline import is_shard_folder, open_offline, open_online
from specfast.ttt import metrics_from_counts, ttt_counts, ttt_unroll

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog, plot_metrics
from .schedule import lr_factor

log = logging.getLogger("specfast")

# Changing these between a run and its resumption would silently change what is trained.
RESUME_MUST_MATCH = (
    "data",
    "target",
    "ttt_steps",
    "batch_tokens",
    "grad_accum",
    "seed",
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "max_steps",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "aux_layer_ids",
    "init_from_target",
)


def open_batches(cfg: TrainConfig, device: torch.device):
    """Online (a prepared dataset: the target runs in the loop) or offline (a shard folder from
    `specfast capture`: only the target's tokenizer, embeddings and lm_head are loaded)."""
    from specfast.targets import load_target

    if is_shard_folder(cfg.data):
        from specfast.shards import ShardDataset
        from specfast.targets import resolve_target_path
        from specfast.targets.heads import HeadsOnlyTarget

        dataset = ShardDataset(cfg.data)
        captured = dataset.capture["aux_layer_ids"]
        ids = cfg.parsed_aux_layer_ids()
        if ids is not None and ids != captured:
            raise ValueError(f"{cfg.data}: captured aux layers {captured}, config asks for {ids}")
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        target = HeadsOnlyTarget(
            resolve_target_path(cfg.target), captured, device, dtype, cfg.target
        )
        return open_offline(dataset, target, cfg.batch_tokens, cfg.seed, device)
    data = PreparedData.load(cfg.data)  # before the target: bad data fails fast
    target = load_target(cfg.target, device=str(device), aux_layer_ids=cfg.parsed_aux_layer_ids())
    return open_online(data, target, cfg.batch_tokens, cfg.seed, device)


def train(cfg: TrainConfig, resume: bool | str = False) -> dict:
    """Train a draft; returns a summary. `resume`: True for the latest checkpoint in cfg.out, or a
    path."""
    cfg.validate()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    batches = open_batches(cfg, device)
    target = batches.target
    draft = new_draft(target, batches.vocab, cfg.init_from_target, device)
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )

    def set_lr() -> float:
        if (
            cfg.max_minutes > 0
        ):  # time-boxed: the decay ends with the budget (or max_steps, if sooner)
            progress = max(step / cfg.max_steps, train_seconds / (cfg.max_minutes * 60))
        else:
            progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        lr = cfg.lr * lr_factor(step, cfg.warmup_steps, progress, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    step, tokens_seen, train_seconds = 0, 0, 0.0
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out) if resume is True else Path(resume)
        if ckpt is None:
            raise FileNotFoundError(f"{out}: no checkpoint to resume from")
        state = load_checkpoint(ckpt, draft, optimizer)
        saved = state["config"]
        changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(
                f"{ckpt}: cannot resume with changed settings: "
                + ", ".join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            )
        batches.load_state_dict(state["data"])
        step, tokens_seen, train_seconds = (
            state["step"],
            state["tokens_seen"],
            state["train_seconds"],
        )
        log.info("resumed from %s at step %d", ckpt, step)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    metrics = MetricsLog(out, step if ckpt else None, cfg.tensorboard)

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    window = []  # recent per-step count tensors, for smoothed metrics in the bar and summary
    # A time-boxed run shows its progress through the time budget, others through max_steps.
    timed = cfg.max_minutes > 0
    bar = tqdm(
        total=round(cfg.max_minutes * 60) if timed else cfg.max_steps,
        initial=int(train_seconds) if timed else step,
        desc="train",
        unit="s" if timed else "step",
        disable=not cfg.progress,
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}{postfix}]" if timed else None,
    )

    def checkpoint():
        state = {
            "config": cfg.to_dict(),
            "data": batches.state_dict(),
            "tokens_seen": tokens_seen,
            "train_seconds": train_seconds,
        }
        path = save_checkpoint(out, step, draft, optimizer, state, cfg.keep_checkpoints)
        metrics.sync()
        plot_metrics(metrics.path, out / "metrics.png")
        return path

    last_saved = step
    try:
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            counts, n_tokens, step_losses, loss_total = None, 0, None, 0.0
            for _ in range(cfg.grad_accum):
                batch = batches.next()
                with autocast:
                    res = ttt_unroll(draft, batch, cfg.ttt_steps, recompute=cfg.recompute)
                (res.loss / cfg.grad_accum).backward()
                c = ttt_counts(res.correct, res.valid)
                counts = c if counts is None else counts + c
                n_tokens += batch.num_tokens
                loss_total += float(res.loss.detach()) / cfg.grad_accum
                sl = [x / cfg.grad_accum for x in res.step_losses]
                step_losses = (
                    sl if step_losses is None else [a + b for a, b in zip(step_losses, sl)]
                )
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            lr = set_lr()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            step += 1
            tokens_seen += n_tokens
            train_seconds += dt
            m = metrics_from_counts(counts, step_losses)
            metrics.log(
                {
                    "step": step,
                    "loss": loss_total,
                    **m,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": n_tokens,
                    "tokens_per_s": n_tokens / dt,
                    "elapsed_s": train_seconds,
                }
            )
            window = (window + [counts])[-50:]
            smooth = metrics_from_counts(sum(window))
            bar.update(min(dt, bar.total - bar.n) if timed else 1)
            bar.set_postfix(
                step=step,
                loss=f"{loss_total:.3f}",
                acc0=f"{smooth['acc'][0]:.3f}",
                tau=f"{smooth['sim_accept_len']:.2f}",
                tok_s=f"{tokens_seen / train_seconds:.0f}",
            )
            out_of_time = cfg.max_minutes > 0 and train_seconds >= cfg.max_minutes * 60
            if step % cfg.save_every == 0 or step == cfg.max_steps or out_of_time:
                checkpoint()
                last_saved = step
            if out_of_time:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
                break
    except KeyboardInterrupt:
        if step > last_saved:
            log.warning("interrupted: saving step %d before exiting", step)
            checkpoint()
        raise
    finally:
        bar.close()
        metrics.close()

    smooth = metrics_from_counts(sum(window)) if window else {}
    summary = {
        "steps": step,
        "tokens": tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(tokens_seen / max(train_seconds, 1e-9), 1),
        "checkpoint": str(latest_checkpoint(out)),
        **{f"recent_{k}": v for k, v in smooth.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
