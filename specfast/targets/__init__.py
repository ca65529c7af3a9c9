"""Target models: the LLM whose hidden states teach the draft."""

from .base import PackedTargetOutput, TargetCache, TargetModel
from .hf import HFTarget
from .multimodal import MultimodalTarget
from .registry import load_target, resolve_target_path

__all__ = [
    "TargetModel",
    "TargetCache",
    "PackedTargetOutput",
    "HFTarget",
    "MultimodalTarget",
    "load_target",
    "resolve_target_path",
]
