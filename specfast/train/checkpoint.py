"""Training checkpoints: everything needed to continue exactly — draft weights, optimizer, step and
schedule, RNG states and data position — written atomically (temp folder, fsync, rename).

    OUT/checkpoints/step_00000100/  draft.safetensors  optimizer.pt  rng.pt  state.json
"""

from __future__ import annotations

import ast
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from specfast.fileio import atomic_dir
from specfast.model.checkpoint_files import (
    latest_checkpoint,
    list_checkpoints,
    load_draft_weights,
    save_draft_weights,
    step_dir_name,
)
from specfast.model.load import load_weights

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]


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


def save_checkpoint(out: Path, step: int, draft, optimizer, state: dict, keep: int) -> Path:
    final = Path(out) / "checkpoints" / step_dir_name(step)
    with atomic_dir(final) as tmp:
        save_draft_weights(draft, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, draft, optimizer) -> dict:
    tensors, _ = load_draft_weights(ckpt)
    load_weights(draft, tensors, str(ckpt))
    optimizer.load_state_dict(
        torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
    )
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())
