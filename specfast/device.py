"""The one place a `--device` string becomes a torch.device."""

from __future__ import annotations

import time

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


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """`--precision` → the dtype of matmuls: `auto` is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def cpu_bf16_is_fast(threshold: float = 1.3) -> bool:
    """Whether bf16 matmuls beat fp32 ones on this CPU by `threshold` (AVX-512 BF16 or AMX: about
    2x; elsewhere bf16 is emulated and slower). Timed, not looked up: a flag list does not say
    what oneDNN will run. About 50 ms."""

    gen = torch.Generator().manual_seed(0)  # not the global RNG: callers seed it for the draft

    def best(dtype):
        a = torch.randn(256, 512, generator=gen).to(dtype)
        b = torch.randn(512, 512, generator=gen).to(dtype)
        a @ b
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16) >= threshold
