"""`specfast export`: a training checkpoint -> the folder vLLM and SGLang load as an EAGLE-3 draft.

    model.safetensors  bf16 weights (fc, midlayer.*, norm, lm_head), d2t int64, t2d bool; no embed_tokens
    config.json        LlamaForCausalLMEagle3 config; aux layer ids in each loader's own convention

Written to a temporary folder and renamed into place only after every check passed, so an export is
never incomplete or inconsistent.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from specfast import __version__
from specfast.model import DraftConfig, Eagle3Draft
from specfast.train.checkpoint import latest_checkpoint, load_draft_weights


class ExportError(ValueError):
    pass


def vllm_aux_ids(aux_layer_ids: list[int]) -> list[int]:
    """vLLM captures the *input* of decoder layer i, i.e. the output of layer i - 1."""
    return [i + 1 for i in aux_layer_ids]


def export_config(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    c = {
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
        # vLLM reads the top-level ids as "input of decoder layer i".
        "eagle_aux_hidden_state_layer_ids": vllm_aux_ids(cfg.aux_layer_ids),
        # SGLang reads these and adds 1 itself: they are the 0-based outputs.
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids),
            "use_aux_hidden_state": True,
            "use_input_layernorm_in_first_layer": True,
            "use_last_layernorm": True,
        },
        "specfast": {
            "version": __version__,
            "aux_layer_ids": list(cfg.aux_layer_ids),
            "aux_layer_convention": "output_of_layer_0based",
            "target_num_layers": cfg.target_num_layers,
            **cfg.extra,
        },
    }
    return c


def check_consistent(tensors: dict, cfg: DraftConfig, where: str) -> None:
    """Names, shapes, vocab maps and finiteness, against a draft built from the config."""
    expected = {k: v.shape for k, v in Eagle3Draft(cfg).trainable_state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ExportError(f"{where}: tensors do not match the draft config (missing {missing}, unexpected {extra})")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ExportError(f"{where}: {k} has shape {tuple(tensors[k].shape)}, config says {tuple(shape)}")
        if tensors[k].is_floating_point() and not bool(torch.isfinite(tensors[k]).all()):
            raise ExportError(f"{where}: {k} holds NaN or Inf")
    draft_ids = tensors["d2t"].long() + torch.arange(cfg.draft_vocab_size)
    if bool((draft_ids[1:] <= draft_ids[:-1]).any()) or int(draft_ids[0]) < 0 or int(draft_ids[-1]) >= cfg.vocab_size:
        raise ExportError(f"{where}: d2t does not map to strictly ascending target ids in [0, {cfg.vocab_size})")
    t2d = tensors["t2d"].bool()
    if int(t2d.sum()) != cfg.draft_vocab_size or not bool(t2d[draft_ids].all()):
        raise ExportError(f"{where}: t2d disagrees with d2t")
    if len(cfg.aux_layer_ids) != 3 or sorted(set(cfg.aux_layer_ids)) != list(cfg.aux_layer_ids):
        raise ExportError(f"{where}: aux layer ids {cfg.aux_layer_ids} are not 3 distinct ascending layers "
                          "(vLLM sorts and de-duplicates them)")


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "draft.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint nor a training run with checkpoints")
    return latest


def export_draft(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                 extra: dict | None = None) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    tensors, cfg_dict = load_draft_weights(ckpt)
    cfg = DraftConfig.from_dict(cfg_dict)
    if extra:
        cfg.extra.update(extra)
    check_consistent(tensors, cfg, str(ckpt))
    weights = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    weights["d2t"] = tensors["d2t"].to(torch.int64)
    weights["t2d"] = tensors["t2d"].to(torch.bool)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(export_config(cfg, dtype), indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def load_export(folder: str | Path) -> tuple[dict, DraftConfig]:
    """Read an export back (for eval): tensors in fp32 and the DraftConfig."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: not an EAGLE-3 export (needs config.json and model.safetensors)")
    c = json.loads(cfg_path.read_text())
    sf = c.get("specfast", {})
    aux = sf.get("aux_layer_ids")
    if aux is None:
        if "eagle_aux_hidden_state_layer_ids" in c:
            aux = [i - 1 for i in c["eagle_aux_hidden_state_layer_ids"]]
        else:
            n = sf.get("target_num_layers") or 0
            raise ExportError(f"{cfg_path}: no aux layer ids (target with {n} layers?)")
    cfg = DraftConfig(
        hidden_size=c["hidden_size"], target_hidden_size=c.get("target_hidden_size", c["hidden_size"]),
        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        vocab_size=c["vocab_size"], draft_vocab_size=c.get("draft_vocab_size", c["vocab_size"]), aux_layer_ids=aux,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=c.get("rope_theta", 10000.0), rope_scaling=c.get("rope_scaling"),
        max_position_embeddings=c.get("max_position_embeddings", 4096), hidden_act=c.get("hidden_act", "silu"),
        norm_before_residual=bool(c.get("norm_before_residual", False)), target_num_layers=sf.get("target_num_layers", 0),
    )
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop("embed_tokens.weight", None)
    check_consistent(tensors, cfg, str(folder))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, cfg
