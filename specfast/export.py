"""`specfast export`: a training checkpoint -> the folder vLLM and SGLang load as an EAGLE-3 draft,
in the vLLM/SGLang layout or the speculators layout (formats: specfast/model/export_format.py).

The checkpoint is checked against its config first, and the folder is written to a temporary place
and renamed into place (specfast.fileio.atomic_dir), so an export is never incomplete or
inconsistent.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specfast.fileio import atomic_dir
from specfast.model.export_format import (
    CONFIG_FILE,
    FORMATS,
    SPECULATORS_LAYER,
    WEIGHTS_FILE,
    export_config,
    speculators_config,
)
from specfast.model.load import read_checkpoint


def export_draft(
    checkpoint: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    extra: dict | None = None,
    fmt: str = "vllm",
    verifier: str | None = None,
) -> Path:
    """Export a checkpoint folder (or a run folder's latest checkpoint) to `out`, replacing it;
    `extra` goes into config.json's "specfast" section. `fmt`: "vllm" or "sglang" (one layout
    serves both) or "speculators"; `verifier` names the target in the speculators config
    (default: the run's `config.yaml` target)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    tensors, cfg = read_checkpoint(checkpoint)
    if extra:
        cfg.extra.update(extra)
    weights = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()
    }
    weights["d2t"] = tensors["d2t"].to(torch.int64)
    weights["t2d"] = tensors["t2d"].to(torch.bool)
    if fmt == "speculators":
        weights = {k.replace("midlayer.", SPECULATORS_LAYER, 1): v for k, v in weights.items()}
        config = speculators_config(cfg, dtype, verifier or _run_target(checkpoint))
    else:
        config = export_config(cfg, dtype)
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def _run_target(checkpoint: str | Path) -> str:
    """The target named in the run's config.yaml (a run folder, or two levels above a
    checkpoint), or "unknown"."""
    import yaml

    p = Path(checkpoint)
    for run in (p, p.parent.parent):
        cfg = run / "config.yaml"
        if cfg.is_file():
            target = (yaml.safe_load(cfg.read_text()) or {}).get("target")
            if target:
                return str(target)
    return "unknown"
