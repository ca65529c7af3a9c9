"""Names and conventions that several parts of specfast must agree on, defined once.

Aux layer ids. specfast stores the three target hidden states that feed the draft's `fc` as the
*outputs* of 0-based decoder layers (HF `output_hidden_states` index `i + 1`). The loaders spell the
same tensors differently:

- vLLM's `eagle_aux_hidden_state_layer_ids` names the *input* of a layer: vLLM's `j` is our `j - 1`.
- SGLang's `eagle_config.eagle_aux_hidden_state_layer_ids` uses ours and adds 1 itself.

Getting this off by one trains a draft on the wrong features without any error, so every shard
manifest and export records the convention, and every boundary converts through the functions here.
"""

from __future__ import annotations

import torch

AUX_LAYER_CONVENTION = "layer_output_0based"

# Stored hidden-state dtypes by their command-line / manifest names.
HIDDEN_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def aux_layer_ids_default(num_layers: int) -> list[int]:
    """EAGLE-3's default: outputs of layers [1, L//2 - 1, L - 4]
    (vLLM: inputs of 2, L//2, L - 3)."""
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    check_aux_layer_ids(ids, num_layers)
    return ids


def check_aux_layer_ids(ids: list[int], num_layers: int | None = None, where: str = "") -> None:
    """Three distinct ascending layers (within the target, when its depth is known). vLLM sorts and
    de-duplicates the ids it captures, so `fc`'s input blocks only line up with what it feeds if
    ours are already in that order. The last layer's output is not allowed: vLLM and SGLang
    capture layer inputs, and no layer takes it as input."""
    ok = (
        isinstance(ids, (list, tuple))
        and len(ids) == 3
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        and sorted(set(ids)) == list(ids)
        and (num_layers is None or all(i < num_layers - 1 for i in ids))
    )
    if ok:
        return
    prefix = f"{where}: " if where else ""
    span = (
        f"in [0, {num_layers - 1}) (servers capture layer inputs: not the last layer's output)"
        if num_layers is not None
        else ">= 0"
    )
    hint = ""
    if num_layers is not None:
        hint = (
            " a target this shallow is too small for EAGLE-3's default"
            if num_layers < 8
            else f" a {num_layers}-layer target needs --aux-layer-ids"
        )
    raise ValueError(
        f"{prefix}aux layer ids {ids!r} must be 3 distinct ascending layers {span} "
        f"({AUX_LAYER_CONVENTION});{hint}".rstrip(";")
    )


def aux_ids_to_vllm(ids: list[int]) -> list[int]:
    """Ours (output of layer i) -> vLLM's (input of layer i + 1)."""
    return [int(i) + 1 for i in ids]


def aux_ids_from_vllm(ids: list[int]) -> list[int]:
    """vLLM's (input of layer j) -> ours (output of layer j - 1)."""
    return [int(j) - 1 for j in ids]


def hidden_dtype(name: str, where: str = "--dtype") -> torch.dtype:
    """The torch dtype for a stored hidden-state dtype name, or a clear error."""
    if name not in HIDDEN_DTYPES:
        raise ValueError(f"{where} must be one of {', '.join(HIDDEN_DTYPES)}, not {name!r}")
    return HIDDEN_DTYPES[name]
