"""Training checkpoints: everything needed to continue exactly — draft weights, optimizer, step and
schedule, RNG states and data position — written atomically (temp folder, fsync, rename).

    OUT/checkpoints/step_00000100/  draft.safetensors  optimizer.pt  rng.pt  state.json
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),  # tensors load with weights_only
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    import ast

    version, state, gauss = ast.literal_eval(s["python"])
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(out: Path, step: int, draft, optimizer, state: dict, keep: int) -> Path:
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in draft.trainable_state_dict().items()},
              str(tmp / "draft.safetensors"), metadata={"config": json.dumps(draft.config.to_dict())})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_draft_weights(ckpt: Path) -> tuple[dict, dict]:
    """(tensors, draft config dict) from a checkpoint folder."""
    from safetensors import safe_open

    path = Path(ckpt) / "draft.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: not a specfast checkpoint (no draft.safetensors)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no draft config in its metadata")
    return load_file(str(path)), json.loads(meta["config"])


def load_checkpoint(ckpt: Path, draft, optimizer) -> dict:
    tensors, _ = load_draft_weights(ckpt)
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if m != "embed_tokens"]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: checkpoint does not match the draft (missing {missing}, unexpected {unexpected})")
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())
