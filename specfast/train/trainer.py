"""`specfast train`: the loop that ties data, target, draft, TTT unroll, optimizer, checkpoints and
metrics together. Online mode: the target runs inside each step.

One process, or many under torchrun (specfast.train.distributed): every rank builds the same draft,
takes its own batches of the one global plan, and the step's gradients are reduced over the ranks
(DDP or FSDP2), so N ranks with `grad_accum` G train exactly as one process with N·G. Rank 0 alone
writes logs, metrics, the progress bar, TensorBoard, plots and summary; logged numbers are global.

    setup_run ─► resume_run (optional) ─► train_step … ─► save (every save_every steps; at the end)
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from specfast.data.prepared import PreparedData
from specfast.device import compute_dtype
from specfast.malloc import keep_freed_memory, return_freed_memory
from specfast.model.init import init_fc
from specfast.model.load import new_draft
from specfast.pipeline import is_shard_folder, open_offline, open_online
from specfast.ttt import metrics_from_counts, ttt_counts

from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import SINGLE, Ranks, Unroll, batch_fields, gradient_sync
from .live_eval import BestCheckpoint, LiveEval
from .metrics import MetricsLog, plot_metrics
from .schedule import Schedule

log = logging.getLogger("specfast")

# Changing these between a run and its resumption would silently change what is trained.
# (grad_accum may change with the number of ranks: their product, the global batch, may not.)
RESUME_MUST_MATCH = (
    "data",
    "target",
    "ttt_steps",
    "batch_tokens",
    "max_samples",
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
    "lr_schedule",
    "warmup",
    "fc_init",
    "fc_init_rms",
    "teacher_temperature",
)


def open_batches(cfg: TrainConfig, device: torch.device, ranks: Ranks = SINGLE):
    """Online (a prepared dataset: the target runs in the loop) or offline (a shard folder from
    `specfast capture`: only the target's tokenizer, embeddings and lm_head are loaded). Each rank
    gets its own batches of the one global plan."""
    from specfast.targets import load_target

    split = {"rank": ranks.rank, "world_size": ranks.world_size}
    if is_shard_folder(cfg.data):
        from specfast.shards import ShardDataset
        from specfast.targets import resolve_target_path
        from specfast.targets.heads import HeadsOnlyTarget

        if cfg.target_cache_gb:  # before anything loads
            raise ValueError(
                f"{cfg.data}: target_cache_gb is for online training; shards are "
                "already the target's outputs"
            )
        dataset = ShardDataset(cfg.data)
        captured = dataset.capture["aux_layer_ids"]
        ids = cfg.parsed_aux_layer_ids()
        if ids is not None and ids != captured:
            raise ValueError(f"{cfg.data}: captured aux layers {captured}, config asks for {ids}")
        dtype = compute_dtype(cfg.precision, device)
        target = HeadsOnlyTarget(
            resolve_target_path(cfg.target), captured, device, dtype, cfg.target
        )
        return open_offline(
            dataset,
            target,
            cfg.batch_tokens,
            cfg.seed,
            device,
            max_samples=cfg.max_samples,
            **split,
        )
    data = PreparedData.load(cfg.data)  # before the target: bad data fails fast
    target = load_target(
        cfg.target,
        device=str(device),
        dtype=compute_dtype(cfg.precision, device),
        aux_layer_ids=cfg.parsed_aux_layer_ids(),
    )
    if cfg.shard_target and ranks.distributed:
        distributed.shard_target_layers(target)
    return open_online(
        data,
        target,
        cfg.batch_tokens,
        cfg.seed,
        device,
        fused_teacher=not cfg.recompute,
        cache_bytes=int(cfg.target_cache_gb * 2**30),
        max_samples=cfg.max_samples,
        **split,
    )


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: TrainConfig
    ranks: Ranks
    device: torch.device
    out: Path
    batches: object  # pipeline.Batches
    draft: torch.nn.Module
    model: torch.nn.Module  # Unroll(draft), wrapped by DDP / FSDP2 when there are several ranks
    params: list
    optimizer: torch.optim.Optimizer
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    pending: object = None  # a batch read ahead (for the fc init), trained on first


def setup_run(cfg: TrainConfig, ranks: Ranks, device: torch.device, fresh: bool = True) -> Run:
    """The run's data, draft, model and optimizer. `fresh` (not resuming): initialise `fc` from
    the first global batch, which is then the first one trained on."""
    torch.manual_seed(cfg.seed)  # the same initial draft on every rank
    if device.type == "cpu":  # memory is the limit: freed blocks leave the process; else stay
        return_freed_memory() if cfg.recompute else keep_freed_memory()
    batches = open_batches(cfg, device, ranks)
    init_from = cfg.init_from or None  # a published draft to continue
    draft = new_draft(
        batches.target, batches.vocab, cfg.init_from_target, device, init_from=init_from
    )
    pending = None
    if fresh and init_from is None:  # a continued draft keeps its own fc
        pending = batches.next() if cfg.fc_init == "aux_rms" else None
        aux = None if pending is None else pending.aux_hidden
        pos = None if pending is None else pending.positions
        info = init_fc(draft, aux, pos, cfg.fc_init, cfg.fc_init_rms, cfg.seed)
        if ranks.distributed:  # rank 0 holds global batch 0, the batch one process would use
            torch.distributed.broadcast(draft.fc.weight.data, src=0)
        if ranks.is_main:
            log.info("fc init: %s", info)
    model = distributed.wrap(
        Unroll(draft, cfg.ttt_steps, cfg.recompute, cfg.static_bucket, cfg.teacher_temperature),
        cfg.parallel,
        ranks,
        device,
    )
    params = [p for p in model.parameters() if p.requires_grad]  # sharded ones under FSDP2
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )
    run = Run(cfg, ranks, device, Path(cfg.out), batches, draft, model, params, optimizer)
    run.pending = pending
    return run


def resume_run(run: Run, where: bool | str) -> Path:
    """Load a checkpoint (True: the latest in the run folder) into `run`, on any number of ranks."""
    cfg = run.cfg
    ckpt = latest_checkpoint(run.out) if where is True else Path(where)
    if ckpt is None:
        raise FileNotFoundError(f"{run.out}: no checkpoint to resume from")
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no state.json)")
    state = load_checkpoint(ckpt, run.model, run.draft, run.optimizer, run.ranks)
    saved = state["config"]
    changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise ValueError(
            f"{ckpt}: cannot resume with changed settings: "
            + ", ".join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        )
    saved_world = state.get("world_size", 1)
    if saved["grad_accum"] * saved_world != cfg.grad_accum * run.ranks.world_size:
        raise ValueError(
            f"{ckpt}: cannot resume with a different global batch: saved by {saved_world} "
            f"rank(s) x grad_accum {saved['grad_accum']}, now {run.ranks.world_size} x "
            f"{cfg.grad_accum}; set --grad-accum so that ranks x grad_accum = "
            f"{saved['grad_accum'] * saved_world}"
        )
    run.batches.load_state_dict(state["data"])
    run.step, run.tokens_seen, run.train_seconds = (
        state["step"],
        state["tokens_seen"],
        state["train_seconds"],
    )
    log.info("resumed from %s at step %d (saved by %d rank(s))", ckpt, run.step, saved_world)
    return ckpt


def set_lr(run: Run) -> float:
    lr = run.cfg.lr * Schedule.from_config(run.cfg).factor(run.step, run.train_seconds)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    return lr


def train_step(run: Run) -> dict:
    """One optimizer step over grad_accum micro-batches per rank; returns the step's global
    metrics (sums over all ranks' batches)."""
    cfg = run.cfg
    dtype = compute_dtype(cfg.precision, run.device)
    autocast = (  # fp32 weights, optimizer and sums; bf16 matmuls
        torch.autocast(run.device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    counts, n_tokens, loss_sum, step_loss_sum, supervising = None, 0, 0.0, None, 0
    for i in range(cfg.grad_accum):
        batch = run.pending if run.pending is not None else run.batches.next()
        run.pending = None
        with gradient_sync(run.model, sync=i == cfg.grad_accum - 1):
            with autocast:
                loss, correct, valid, step_losses = run.model(**batch_fields(batch))
            (loss / cfg.grad_accum).backward()
        c = ttt_counts(correct, valid)
        counts = c if counts is None else counts + c
        supervising += int(c[:, 0].sum() > 0)
        n_tokens += batch.num_tokens
        loss_sum += float(loss.detach())
        step_loss_sum = step_losses if step_loss_sum is None else step_loss_sum + step_losses
    counts = distributed.all_sum(counts.to(run.device)).cpu()
    sums = distributed.all_sum(
        torch.tensor(
            [loss_sum, n_tokens, supervising, *step_loss_sum.tolist()], dtype=torch.float64
        ).to(run.device)
    ).cpu()
    # Each micro-batch's loss is a mean over its own supervised tokens; the step's gradient and
    # loss are the mean over those of the N·G micro-batches (G per rank, N ranks) that supervise
    # something. One whose rows supervise nothing (possible online: whether the target's picks
    # fall in the draft vocabulary is known only after its forward) has zero gradients and must
    # not dilute the others.
    n = run.ranks.world_size * cfg.grad_accum
    m = int(sums[2])
    lr = set_lr(run)
    # With nothing supervised at all, AdamW would still move the weights (momentum, decay): the
    # step leaves the weights and the optimizer's state alone.
    skipped = m == 0
    if skipped:
        grad_norm = torch.zeros(())
    else:
        if m < n:  # backward divided each loss by G and the ranks' all-reduce by N
            for p in run.params:
                if p.grad is not None:
                    p.grad.mul_(n / m)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)

    dt = distributed.all_max(time.perf_counter() - t0, run.device)  # the slowest rank's time
    run.step += 1
    tokens = int(sums[1])
    run.tokens_seen += tokens
    run.train_seconds += dt
    return {
        "step": run.step,
        "loss": float(sums[0]) / max(m, 1),
        **metrics_from_counts(counts, [float(x) / max(m, 1) for x in sums[3:]]),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "skipped": int(skipped),  # 1: nothing supervised, the weights did not move
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "elapsed_s": run.train_seconds,
        "counts": counts,
    }


def save(run: Run, metrics: MetricsLog | None) -> Path:
    state = {
        "config": run.cfg.to_dict(),
        "data": run.batches.state_dict(),
        "tokens_seen": run.tokens_seen,
        "train_seconds": run.train_seconds,
    }
    path = save_checkpoint(
        run.out,
        run.step,
        run.model,
        run.draft,
        run.optimizer,
        state,
        run.cfg.keep_checkpoints,
        run.ranks,
    )
    if metrics is not None:
        metrics.sync()
        plot_metrics(metrics.path, run.out / "metrics.png")
    return path


def train(cfg: TrainConfig, resume: bool | str = False) -> dict:
    """Train a draft; returns a summary (on every rank). `resume`: True for the latest checkpoint
    in cfg.out, or a path."""
    cfg.validate()
    ranks, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, resume, ranks, device)
    finally:
        distributed.teardown()


def _progress_bar(run: Run) -> tqdm:
    """A time-boxed run shows its progress through the time budget, others through max_steps."""
    cfg = run.cfg
    timed = cfg.max_minutes > 0
    return tqdm(
        total=round(cfg.max_minutes * 60) if timed else cfg.max_steps,
        initial=int(run.train_seconds) if timed else run.step,
        desc="train",
        unit="s" if timed else "step",
        disable=not (cfg.progress and run.ranks.is_main),
        dynamic_ncols=True,
        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}{postfix}]" if timed else None,
    )


def _train(cfg: TrainConfig, where: bool | str, ranks: Ranks, device: torch.device) -> dict:
    run = setup_run(cfg, ranks, device, fresh=not where)
    ckpt = resume_run(run, where) if where else None
    main = ranks.is_main
    metrics = None
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        metrics = MetricsLog(run.out, run.step if ckpt else None, cfg.tensorboard)
        if ranks.distributed:
            log.info(
                "%d ranks, %s, %d micro-batch(es) per rank per step",
                ranks.world_size,
                cfg.parallel,
                cfg.grad_accum,
            )
    live = best = None
    if cfg.eval_every:
        if ranks.distributed and cfg.parallel == "fsdp2":
            raise ValueError(
                "eval_every: in-training eval under fsdp2 with several ranks is not supported "
                "yet; evaluate the checkpoints with `specfast eval`"
            )
        if main:
            live, best = LiveEval.for_training(cfg, run.batches.target), BestCheckpoint(run.out)
    window = []  # recent per-step count tensors, for smoothed metrics in the bar and summary
    timed = cfg.max_minutes > 0
    bar = _progress_bar(run)
    last_saved = run.step
    try:
        while run.step < cfg.max_steps:
            record = train_step(run)
            counts = record.pop("counts")
            window = (window + [counts])[-50:]
            out_of_time = timed and run.train_seconds >= cfg.max_minutes * 60
            last = out_of_time or run.step == cfg.max_steps
            if live is not None and (run.step % cfg.eval_every == 0 or last):
                ev = live(run.draft, run.step)  # rank 0 alone: the others wait in the next step
                record.update(ev)
                best.update(run.draft, run.step, ev)
            if main:
                metrics.log(record)
                smooth = metrics_from_counts(sum(window))
                bar.update(min(record["elapsed_s"] - bar.n, bar.total - bar.n) if timed else 1)
                bar.set_postfix(
                    step=run.step,
                    loss=f"{record['loss']:.3f}",
                    acc0=f"{smooth['acc'][0]:.3f}",
                    tau=f"{smooth['sim_accept_len']:.2f}",
                    tok_s=f"{run.tokens_seen / run.train_seconds:.0f}",
                )
            if run.step % cfg.save_every == 0 or run.step == cfg.max_steps or out_of_time:
                save(run, metrics)
                last_saved = run.step
            if out_of_time:
                log.info("time budget of %.1f min reached at step %d", cfg.max_minutes, run.step)
                break
    except KeyboardInterrupt:
        # Only a single process saves here: under torchrun the other ranks may already be gone.
        if run.step > last_saved and not ranks.distributed:
            log.warning("interrupted: saving step %d before exiting", run.step)
            save(run, metrics)
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    smooth = metrics_from_counts(sum(window)) if window else {}
    summary = {
        "steps": run.step,
        "tokens": run.tokens_seen,
        "train_seconds": round(run.train_seconds, 1),
        "tokens_per_s": round(run.tokens_seen / max(run.train_seconds, 1e-9), 1),
        "checkpoint": str(latest_checkpoint(run.out)),
        **{f"recent_{k}": v for k, v in smooth.items()},
    }
    cache = getattr(run.batches.source, "cache", None)
    if cache is not None:
        summary["target_cache"] = cache.stats()
        log.info("target output cache: %s", summary["target_cache"])
    if main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
