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
