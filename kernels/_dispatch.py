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


BACKENDS = ("auto", "triton", "torch", "reference")
# Where a caller leaves backend="auto", this environment variable may name the path for every op,
# e.g. SPECFAST_KERNELS=reference to run a whole training step on the plain-PyTorch definitions
# (what a benchmark compares the fused kernels against, or a check when a kernel is in doubt).
ENV_VAR = "SPECFAST_KERNELS"


def env_backend(backend: str) -> str:
    """`backend`, or the path SPECFAST_KERNELS names where `backend` is "auto"."""
    if backend != "auto":
        return backend
    forced = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if forced not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(BACKENDS)}")
    return forced


def choose_backend(op: str, t, backend: str) -> str:
    """Resolve `backend` ("auto" | "triton" | "torch" | "reference") for an op whose main input is
    the tensor `t`: auto takes Triton on CUDA tensors and the torch path elsewhere, said once."""
    backend = env_backend(backend)
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
