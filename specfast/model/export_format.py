"""The export folder vLLM and SGLang load as an EAGLE-3 draft, both ways: the DraftConfig to its
config.json (`specfast export` writes it) and back (eval reads exports).

    model.safetensors  weights (fc, midlayer.*, norm, lm_head), d2t int64, t2d bool; no embed_tokens
    config.json        LlamaForCausalLMEagle3 config; aux layer ids in each loader's own convention
"""

from __future__ import annotations

import torch

from specfast import __version__
from specfast.conventions import AUX_LAYER_CONVENTION, aux_ids_from_vllm, aux_ids_to_vllm

from .config import DraftConfig, DraftFormatError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export_config(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": cfg.rope_parameters(),  # what transformers 5 and vLLM 0.32 read
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "norm_before_residual": cfg.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": aux_ids_to_vllm(cfg.aux_layer_ids),
        # SGLang reads these and adds 1 itself: they are ours.
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids),
            "use_aux_hidden_state": True,
            "use_input_layernorm_in_first_layer": True,
            "use_last_layernorm": True,
        },
        "specfast": {
            "version": __version__,
            "aux_layer_ids": list(cfg.aux_layer_ids),
            "aux_layer_convention": AUX_LAYER_CONVENTION,
            "target_num_layers": cfg.target_num_layers,
            **cfg.extra,
        },
    }


def config_from_export(c: dict, where: str) -> DraftConfig:
    """The DraftConfig of an export's config.json (ours, or another trainer's with vLLM's ids)."""
    sf = c.get("specfast", {})
    aux = sf.get("aux_layer_ids")
    if aux is None:
        if "eagle_aux_hidden_state_layer_ids" not in c:
            n = sf.get("target_num_layers") or 0
            raise DraftFormatError(f"{where}: no aux layer ids (target with {n} layers?)")
        aux = aux_ids_from_vllm(c["eagle_aux_hidden_state_layer_ids"])
    heads = c["num_attention_heads"]
    return DraftConfig(
        hidden_size=c["hidden_size"],
        target_hidden_size=c.get("target_hidden_size", c["hidden_size"]),
        num_attention_heads=heads,
        num_key_value_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        intermediate_size=c["intermediate_size"],
        vocab_size=c["vocab_size"],
        draft_vocab_size=c.get("draft_vocab_size", c["vocab_size"]),
        aux_layer_ids=aux,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", 10000.0),
        rope_scaling=c.get("rope_scaling"),
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        hidden_act=c.get("hidden_act", "silu"),
        norm_before_residual=bool(c.get("norm_before_residual", False)),
        target_num_layers=sf.get("target_num_layers", 0),
    )
