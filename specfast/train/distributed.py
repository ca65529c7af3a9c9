"""Many processes through PyTorch's own engine: torchrun starts one process per rank and sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address; this module turns that environment into a
process group (NCCL on CUDA, gloo on CPU), wraps the draft for data parallelism (DDP or FSDP2
`fully_shard`), and sums metrics over ranks.

Without torchrun (or with one process) nothing is initialised and every helper is a no-op, so a
single-process run is exactly what it was. Collectives time out after SPECFAST_DIST_TIMEOUT_S
seconds (default 600), so a rank that stops answering ends the job with an error instead of a hang;
a rank that dies is seen by torchrun at once, which stops the others and names the rank.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import nn

from specfast.device import resolve_device
from specfast.ttt import PackedBatch, ttt_unroll

log = logging.getLogger("specfast")

PARALLEL_MODES = ("ddp", "fsdp2")
TIMEOUT_ENV = "SPECFAST_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics, progress bars, plots and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()  # one process, no process group


def ranks_from_env() -> Ranks:
    """This process's place in the job, from torchrun's variables (absent: one process)."""

    def var(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        if value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment: {name}={value!r} is not an integer") from None

    r = Ranks(var("RANK", 0), var("WORLD_SIZE", 1), var("LOCAL_RANK", 0))
    if r.world_size < 1 or not 0 <= r.rank < r.world_size:
        raise ValueError(f"environment: RANK={r.rank} is not in [0, WORLD_SIZE={r.world_size})")
    return r


def collective_timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"environment: {TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"environment: {TIMEOUT_ENV} must be > 0, not {seconds}")
    return datetime.timedelta(seconds=seconds)


def setup(
    device_name: str, timeout: datetime.timedelta | None = None
) -> tuple[Ranks, torch.device]:
    """Join the job (if there is one) and pick this rank's device: cuda:LOCAL_RANK under torchrun
    on a GPU machine. `timeout`: for collectives (default: SPECFAST_DIST_TIMEOUT_S)."""
    ranks = ranks_from_env()
    device = resolve_device(device_name)
    if not ranks.distributed:
        return ranks, device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timeout or collective_timeout(),
            device_id=device if device.type == "cuda" else None,
        )
    if dist.get_world_size() != ranks.world_size:
        raise RuntimeError(
            f"process group has {dist.get_world_size()} ranks, WORLD_SIZE says {ranks}"
        )
    _rank_logging(ranks)
    return ranks, device


def _rank_logging(ranks: Ranks) -> None:
    """Every rank logs its warnings and errors, prefixed with its rank; rank 0 logs progress."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"specfast[rank {ranks.rank}]: %(message)s"))
    if not ranks.is_main:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over ranks (in place)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Unroll(nn.Module):
    """The whole TTT unroll of one packed batch as one forward of a module that owns the draft, so
    that DDP and FSDP2 see one forward and one backward per micro-batch. Tensors in (the batch's
    fields as keywords), tensors out: (loss, correct, valid, step losses)."""

    def __init__(
        self,
        draft: nn.Module,
        steps: int,
        recompute: bool,
        bucket: int = 0,
        teacher_temperature: float = 1.0,
    ):
        super().__init__()
        self.draft, self.steps, self.recompute, self.bucket = draft, steps, recompute, bucket
        self.teacher_temperature = teacher_temperature

    def forward(self, **batch_fields):
        batch = PackedBatch(**batch_fields)
        res = ttt_unroll(
            self.draft, batch, self.steps, self.recompute, self.bucket, self.teacher_temperature
        )
        return res.loss, res.correct, res.valid, torch.tensor(res.step_losses, dtype=torch.float64)


def batch_fields(batch: PackedBatch) -> dict:
    return {f.name: getattr(batch, f.name) for f in fields(batch)}


def wrap(unroll: Unroll, parallel: str, ranks: Ranks, device: torch.device) -> nn.Module:
    """The module the training step calls: `unroll` itself on one process, else DDP (every rank
    holds the whole draft; gradients all-reduced) or FSDP2 (`fully_shard`: parameters, gradients
    and optimizer state sharded over the ranks)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"config: parallel must be one of {PARALLEL_MODES}, not {parallel!r}")
    if not ranks.distributed:
        return unroll
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            unroll,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,  # d2t/t2d: set identically on every rank, never changed
        )
    from torch.distributed.fsdp import fully_shard

    # One group for the whole draft (it is small next to the target): every forward gathers it.
    return fully_shard(unroll)


def shard_target_layers(target) -> None:
    """FSDP2 over a frozen online target's decoder layers: each rank keeps 1/N of every layer and a
    forward gathers one layer at a time, for a target that does not fit one device. Embeddings and
    lm_head stay whole (the draft shares the embeddings, the teacher reads lm_head rows). Every
    rank runs one target forward per micro-batch, so the gathers stay in step."""
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(getattr(target, "model", None), "base_model", None), "layers", None)
    if layers is None:
        raise ValueError(f"--shard-target: target {target.name} has no decoder layers to shard")
    for layer in layers:
        fully_shard(layer)


def gradient_sync(model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are reduced over ranks only on the
    last micro-batch of a step (`sync`), the others accumulate locally."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
