"""Choosing a kernel path by device, and saying which one once in the log."""

import logging
import os

log = logging.getLogger("specfast.kernels")
_said: set = set()


def log_once(key: str, message: str) -> None:
    """Log `message` the first time `key` is seen in this process."""
    if key not in _said:
        _said.add(key)
        log.info(message)


def triton_available() -> bool:
    """Triton kernels launch on CUDA tensors, or anywhere under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(op: str, t, backend: str) -> str:
    """Resolve `backend` ("auto" | "triton" | "torch" | "reference") for an op whose main input is
    the tensor `t`: auto takes Triton on CUDA tensors and the torch path elsewhere, said once."""
    if backend == "auto":
        backend = "triton" if t.is_cuda and triton_available() else "torch"
        log_once(f"{op}.{t.device.type}.{backend}", f"{op}: {backend} path on {t.device.type}")
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package")
        if not t.is_cuda and not interpreting():
            raise RuntimeError(f"{op}: Triton on CPU tensors needs TRITON_INTERPRET=1")
    elif backend not in ("torch", "reference"):
        raise ValueError(f"{op}: unknown backend {backend!r}")
    return backend
