"""Test setup: Triton kernels run in the interpreter on this CPU machine. It must be set before any
kernel is defined, so it happens here, before test modules import specfast.kernels."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def seed():
    """A fresh seed per test, printed so a failure can be replayed (pytest -s shows it)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s
