"""Where a training run keeps its drafts, and the draft file inside each checkpoint.

    RUN/checkpoints/step_00000100/draft.safetensors
        the draft's trainable tensors, with its DraftConfig as JSON in the metadata key "config"

A checkpoint counts once its `state.json` exists (the trainer writes the folder atomically, with
optimizer, RNG states and data position beside the draft). This module is the one place that reads
and writes the draft file and finds checkpoints, for train, export and eval.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from specfast.fileio import atomic_save_safetensors

STEP_DIR = re.compile(r"^step_(\d{8})$")
DRAFT_FILE = "draft.safetensors"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run: str | Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run: str | Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as is, or a run folder's latest checkpoint."""
    path = Path(path)
    if (path / DRAFT_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint nor a training run with checkpoints")
    return latest


def save_draft_weights(draft, folder: str | Path) -> Path:
    """Write `draft`'s trainable tensors and config as `folder/draft.safetensors`."""
    path = Path(folder) / DRAFT_FILE
    atomic_save_safetensors(
        draft.trainable_state_dict(), path, metadata={"config": json.dumps(draft.config.to_dict())}
    )
    return path


def load_draft_weights(ckpt: str | Path) -> tuple[dict, dict]:
    """(tensors, draft config dict) from a checkpoint folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(ckpt) / DRAFT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: not a specfast checkpoint (no {DRAFT_FILE})")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no draft config in its metadata")
    return load_file(str(path)), json.loads(meta["config"])
