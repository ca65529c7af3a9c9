"""The export folders an EAGLE-3 draft is published in, both ways: the DraftConfig to its
config.json (`specfast export` writes it) and back (eval and `train --init-from` read it).

Format "vllm" (also what SGLang loads; SpecForge's export is this layout too):

    model.safetensors  weights (fc, midlayer.*, norm, lm_head), d2t int64, t2d bool; no embed_tokens
    config.json        LlamaForCausalLMEagle3 config; aux layer ids in each loader's own convention

Format "speculators" (vllm-project/speculators; vLLM reads it through its `speculators` config):

    model.safetensors  the same tensors, the decoder layer named `layers.0.*` (not `midlayer.*`)
    config.json        `speculators_model_type: "eagle3"`, the layer's Llama config under
                       `transformer_layer_config`, `draft_vocab_size`, `target_hidden_size`,
                       `norm_before_residual` (explicit: vLLM's default for it is true),
                       `eagle_aux_hidden_state_layer_ids` (vLLM's convention) and
                       `speculators_config` (algorithm, proposal method, verifier)
"""

from __future__ import annotations

import torch

from specfast import __version__
from specfast.conventions import AUX_LAYER_CONVENTION, aux_ids_from_vllm, aux_ids_to_vllm

from .config import DraftConfig, DraftFormatError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMATS = ("vllm", "sglang", "speculators")  # vllm and sglang: one folder serves both
SPECULATORS_LAYER = "layers.0."  # speculators' name for our `midlayer.`


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


def _layer_config(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    """The decoder layer's Llama config, as speculators nests it."""
    keys = (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
        "max_position_embeddings", "vocab_size",
    )  # fmt: skip
    full = export_config(cfg, dtype)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        **{k: full[k] for k in keys},
        "rope_parameters": full["rope_parameters"],
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": full["torch_dtype"],
    }


def speculators_config(
    cfg: DraftConfig, dtype: torch.dtype, verifier: str, speculative_tokens: int = 3
) -> dict:
    """config.json of the speculators format. `verifier`: the target's name or path (vLLM
    requires the field; it does not load the target from it)."""
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": _layer_config(cfg, dtype),
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "norm_before_residual": cfg.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": aux_ids_to_vllm(cfg.aux_layer_ids),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": speculative_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
        "specfast": export_config(cfg, dtype)["specfast"],
    }


def is_speculators_config(c: dict) -> bool:
    return "speculators_model_type" in c


def config_from_speculators(c: dict, where: str) -> DraftConfig:
    """The DraftConfig of a speculators-format config.json."""
    if c.get("speculators_model_type") != "eagle3":
        raise DraftFormatError(
            f"{where}: speculators_model_type is {c.get('speculators_model_type')!r}, "
            "not an EAGLE-3 draft"
        )
    layer = c.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise DraftFormatError(f"{where}: no transformer_layer_config")
    flat = {k: v for k, v in c.items() if k != "transformer_layer_config"}
    flat = {**layer, **flat, "norm_before_residual": c.get("norm_before_residual", True)}
    return config_from_export(flat, where)


def config_from_export(
    c: dict, where: str, default_aux_layer_ids: list[int] | None = None
) -> DraftConfig:
    """The DraftConfig of an export's config.json (ours, or another trainer's with vLLM's ids).
    `default_aux_layer_ids` (ours) stands in where the config names none (SpecForge's exports
    rely on the EAGLE-3 default)."""
    sf = c.get("specfast", {})
    aux = sf.get("aux_layer_ids")
    if aux is None:
        nested = c.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
        if "eagle_aux_hidden_state_layer_ids" in c:
            aux = aux_ids_from_vllm(c["eagle_aux_hidden_state_layer_ids"])
        elif nested is not None:  # SGLang's spelling: already ours
            aux = list(nested)
        elif default_aux_layer_ids is not None:
            aux = list(default_aux_layer_ids)
        else:
            n = sf.get("target_num_layers") or 0
            raise DraftFormatError(f"{where}: no aux layer ids (target with {n} layers?)")
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in c:
            raise DraftFormatError(f"{where}: config lacks {key!r}")
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
