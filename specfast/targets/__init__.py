"""Target models: the LLM whose hidden states teach the draft."""
from .base import PackedTargetOutput, TargetModel, aux_layer_ids_default
from .hf import HFTarget
from .registry import load_target, resolve_target_path

__all__ = ["TargetModel", "PackedTargetOutput", "HFTarget", "load_target", "resolve_target_path", "aux_layer_ids_default"]
