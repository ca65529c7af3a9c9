"""Training checkpoints: everything needed to continue exactly — draft weights, optimizer, step and
schedule, RNG states and data position — written atomically (temp folder, fsync, rename), by one
process or by all the ranks of a job together.

    OUT/checkpoints/step_00000100/
        draft.safetensors   the whole draft (gathered on rank 0): what export and eval read
        dcp/                torch.distributed.checkpoint of {"model", "optim"}; it reshards, so the
                            run resumes on any number of ranks, DDP or FSDP2
        rng_0.pt ...        each rank's RNG states (a rank that did not save takes rank 0's)
        state.json          step, world size, config, global data position; a checkpoint counts
                            once the folder holding it has been renamed into place

A folder written by specfast before DCP (optimizer.pt, rng.pt) still resumes on one process.
"""

from __future__ import annotations

import ast
import contextlib
import json
import random
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from specfast.fileio import atomic_dir
from specfast.model.checkpoint_files import (
    latest_checkpoint,
    list_checkpoints,
    load_draft_weights,
    save_draft_weights,
    step_dir_name,
)
from specfast.model.load import load_weights

from .distributed import SINGLE, Ranks, barrier, broadcast_object

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

DCP_DIR = "dcp"
DRAFT_PREFIX = "draft."  # the draft's name inside distributed.Unroll


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # as a tensor, so that it loads with weights_only
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    version, state, gauss = ast.literal_eval(s["python"])
    random.setstate((version, tuple(state), gauss))


def _dcp_state(model, optimizer) -> dict:
    """Model and optimizer state keyed by parameter name (sharded tensors under FSDP2), the form
    DCP saves and reshards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _full_draft(model, draft) -> SimpleNamespace:
    """The whole draft's tensors on rank 0 (an all-gather under FSDP2), shaped for
    save_draft_weights; other ranks get an empty dict."""
    if not dist.is_initialized():
        tensors = draft.trainable_state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        tensors = {k[len(DRAFT_PREFIX) :]: v for k, v in full.items()}
    return SimpleNamespace(trainable_state_dict=lambda: tensors, config=draft.config)


def save_checkpoint(
    out: Path, step: int, model, draft, optimizer, state: dict, keep: int, ranks: Ranks = SINGLE
) -> Path:
    """Collective: every rank calls it. `model` is what the step runs (distributed.wrap's result),
    `draft` the draft inside it."""
    final = Path(out) / "checkpoints" / step_dir_name(step)

    def fill(tmp: Path | None) -> None:
        tmp = Path(broadcast_object(str(tmp) if tmp is not None else None))
        full = _full_draft(model, draft)
        import torch.distributed.checkpoint as dcp

        with _single_process_quiet():
            dcp.save(
                _dcp_state(model, optimizer),
                checkpoint_id=tmp / DCP_DIR,
                no_dist=not dist.is_initialized(),
            )
        torch.save(rng_state(), tmp / f"rng_{ranks.rank}.pt")
        if ranks.is_main:
            save_draft_weights(full, tmp)
            record = {"step": step, "world_size": ranks.world_size, **state}
            (tmp / "state.json").write_text(json.dumps(record, indent=2))
        barrier()  # every rank's files are in before rank 0 renames the folder

    if ranks.is_main:
        with atomic_dir(final) as tmp:
            fill(tmp)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob(".step_*.tmp-*"):  # left by a job killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    else:
        fill(None)
    barrier()  # no rank moves on (or exits) before the checkpoint is in place
    return final


def load_checkpoint(ckpt: Path, model, draft, optimizer, ranks: Ranks = SINGLE) -> dict:
    """Collective: every rank calls it. Restores model, optimizer and this rank's RNG; returns the
    saved state (step, world size, config, data position)."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    if (ckpt / DCP_DIR).is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = _dcp_state(model, optimizer)
        with _single_process_quiet():
            dcp.load(sd, checkpoint_id=ckpt / DCP_DIR, no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:  # written before DCP: whole optimizer state of one process
        if ranks.distributed:
            raise ValueError(
                f"{ckpt}: a single-process checkpoint of an older specfast; resume it on one "
                "process first (its next checkpoint resumes on any number)"
            )
        tensors, _ = load_draft_weights(ckpt)
        load_weights(draft, tensors, str(ckpt))
        optimizer.load_state_dict(
            torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        )
    for name in (f"rng_{ranks.rank}.pt", "rng_0.pt", "rng.pt"):
        if (ckpt / name).is_file():
            set_rng_state(torch.load(ckpt / name, weights_only=True))
            break
    return state
