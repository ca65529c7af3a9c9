"""Loading a draft for eval: an export folder (config.json + model.safetensors), a training checkpoint
(draft.safetensors with its config in the metadata) or a training run folder (its latest checkpoint)."""
from __future__ import annotations

from pathlib import Path

import torch

from specfast.model import DraftConfig, Eagle3Draft


def read_draft(path: str | Path) -> tuple[dict, DraftConfig]:
    """(tensors, config) from any of the three folder kinds."""
    from specfast.export import check_consistent, load_export, resolve_checkpoint
    from specfast.train.checkpoint import load_draft_weights

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"draft {path}: no such folder")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return load_export(path)
    ckpt = resolve_checkpoint(path)
    tensors, cfg_dict = load_draft_weights(ckpt)
    cfg = DraftConfig.from_dict(cfg_dict)
    check_consistent(tensors, cfg, str(ckpt / "draft.safetensors"))
    return tensors, cfg


def check_matches_target(cfg: DraftConfig, target, where: str) -> None:
    """The draft must have been trained on this target: same vocabulary, width and aux layers."""
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"{where}: draft is for a {cfg.vocab_size}-token vocabulary, target has {target.vocab_size}")
    if cfg.target_hidden_size != target.hidden_size:
        raise ValueError(f"{where}: draft expects target hidden size {cfg.target_hidden_size}, "
                         f"target has {target.hidden_size}")
    if cfg.target_num_layers and cfg.target_num_layers != target.num_layers:
        raise ValueError(f"{where}: draft was trained on a {cfg.target_num_layers}-layer target, "
                         f"this one has {target.num_layers}")
    if list(cfg.aux_layer_ids) != list(target.aux_layer_ids):
        raise ValueError(f"{where}: draft reads aux layers {cfg.aux_layer_ids} (0-based outputs), "
                         f"the target gives {target.aux_layer_ids}")


def build_draft(tensors: dict, cfg: DraftConfig, target, where: str = "draft") -> Eagle3Draft:
    """Eagle3Draft(cfg) with the tensors loaded strictly (embed_tokens aside), on the target's device,
    sharing the target's embeddings."""
    check_matches_target(cfg, target, where)
    draft = Eagle3Draft(cfg)
    missing, unexpected = draft.load_state_dict(
        {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, strict=False)
    missing = [m for m in missing if m != "embed_tokens"]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the draft config (missing {missing}, unexpected {unexpected})")
    draft.to(target.device).eval().requires_grad_(False)
    draft.attach_target(target.embed_weight().to(torch.float32))
    return draft


def load_draft(path: str | Path, target) -> Eagle3Draft:
    tensors, cfg = read_draft(path)
    return build_draft(tensors, cfg, target, str(path))
