"""`specfast export`: a training checkpoint -> the folder vLLM and SGLang load as an EAGLE-3 draft
(format: specfast/model/export_format.py).

The checkpoint is checked against its config first, and the folder is written to a temporary place
and renamed into place (specfast.fileio.atomic_dir), so an export is never incomplete or
inconsistent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specfast.fileio import atomic_dir
from specfast.model.export_format import CONFIG_FILE, WEIGHTS_FILE, export_config
from specfast.model.load import read_checkpoint


def export_draft(
    checkpoint: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    extra: dict | None = None,
) -> Path:
    """Export a checkpoint folder (or a run folder's latest checkpoint) to `out`, replacing it;
    `extra` goes into config.json's "specfast" section."""
    from safetensors.torch import save_file

    tensors, cfg = read_checkpoint(checkpoint)
    if extra:
        cfg.extra.update(extra)
    weights = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()
    }
    weights["d2t"] = tensors["d2t"].to(torch.int64)
    weights["t2d"] = tensors["t2d"].to(torch.bool)
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(export_config(cfg, dtype), indent=2))
    return out
