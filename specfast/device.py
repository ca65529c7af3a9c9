"""The one place a `--device` string becomes a torch.device."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` picks CUDA when present, else CPU; an explicit CUDA device must exist."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} requested but CUDA is not available")
    return dev
