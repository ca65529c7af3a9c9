"""Every way a draft comes into being: `new_draft` builds one for training (fresh from the
target, or continuing a published draft: `init_from`), `read_draft` reads stored weights (an
export folder in the vLLM/SGLang or speculators layout, SpecForge's export, a training checkpoint,
or a run folder's latest checkpoint) and `load_draft` makes them a ready draft beside the target
they were trained on (eval).

Stored weights are checked against their config before use (`check_draft_tensors`): names, shapes,
finite values, vocabulary maps and aux layers, so a bad checkpoint fails by name, not mid-decode.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from specfast.conventions import check_aux_layer_ids

from .checkpoint_files import DRAFT_FILE, load_draft_weights, resolve_checkpoint
from .config import DraftConfig, DraftFormatError
from .draft import Eagle3Draft
from .export_format import (
    CONFIG_FILE,
    SPECULATORS_LAYER,
    WEIGHTS_FILE,
    config_from_export,
    config_from_speculators,
    is_speculators_config,
)

log = logging.getLogger("specfast")


def new_draft(
    target,
    vocab,
    init_from_target: bool,
    device: torch.device,
    init_from: str | Path | None = None,
) -> Eagle3Draft:
    """A draft for training over `vocab` (a DraftVocab), sharing `target`'s embeddings.

    Fresh (shaped after `target`; `init_from_target` starts lm_head and norm from the target's
    own), or, with `init_from`, continuing a published draft (see `read_draft`): its shape and
    weights, its lm_head rows moved onto `vocab`'s draft ids (ids it lacks keep the fresh start).
    A draft made for another target (vocabulary, width, depth or aux layers) is refused."""
    if not init_from:
        cfg = DraftConfig.from_target(target.hf_config, vocab.size, target.aux_layer_ids)
    else:
        tensors, published = read_draft(init_from, default_aux_layer_ids=target.aux_layer_ids)
        check_matches_target(published, target, f"--init-from {init_from}")
        cfg = replace(published, draft_vocab_size=vocab.size, extra={})
    draft = Eagle3Draft(cfg).to(device)
    draft.set_vocab(vocab.draft_ids)
    draft.attach_target(
        target.embed_weight(),
        target.lm_head_weight() if init_from_target else None,
        target.final_norm_weight() if init_from_target else None,
    )
    if init_from:
        _continue_from(draft, tensors, str(init_from))
    return draft


def _continue_from(draft: Eagle3Draft, tensors: dict, where: str) -> None:
    """Copy a published draft's weights into `draft`; lm_head row by target token id (d2t)."""
    src_ids = tensors["d2t"].long() + torch.arange(tensors["d2t"].numel())
    dst_ids = draft.draft_ids.cpu()
    # Positions of the shared target ids in each vocabulary (both sorted ascending).
    shared = torch.from_numpy(np.intersect1d(src_ids.numpy(), dst_ids.numpy()))
    src_rows = torch.searchsorted(src_ids, shared)
    dst_rows = torch.searchsorted(dst_ids, shared)
    state = {k: v for k, v in tensors.items() if k not in ("d2t", "t2d", "lm_head.weight")}
    with torch.no_grad():
        head = draft.lm_head.weight
        head[dst_rows.to(head.device)] = tensors["lm_head.weight"][src_rows].to(head)
        own = draft.state_dict()
        for k, v in state.items():
            own[k].copy_(v)
    log.info(
        "continuing %s: %d of %d draft tokens carried over (%d new)",
        where,
        len(shared),
        len(dst_ids),
        len(dst_ids) - len(shared),
    )


def check_draft_tensors(tensors: dict, cfg: DraftConfig, where: str) -> None:
    """Names, shapes, vocab maps and finiteness, against a draft built from the config."""
    expected = {k: v.shape for k, v in Eagle3Draft(cfg).trainable_state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise DraftFormatError(
            f"{where}: tensors do not match the draft config "
            f"(missing {missing}, unexpected {extra})"
        )
    for k, shape in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(shape):
            raise DraftFormatError(
                f"{where}: {k} has shape {tuple(t.shape)}, config says {tuple(shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DraftFormatError(f"{where}: {k} holds NaN or Inf")
    draft_ids = tensors["d2t"].long() + torch.arange(cfg.draft_vocab_size)
    ascending = not bool((draft_ids[1:] <= draft_ids[:-1]).any())
    if not ascending or int(draft_ids[0]) < 0 or int(draft_ids[-1]) >= cfg.vocab_size:
        raise DraftFormatError(
            f"{where}: d2t does not map to strictly ascending target ids in [0, {cfg.vocab_size})"
        )
    t2d = tensors["t2d"].bool()
    if int(t2d.sum()) != cfg.draft_vocab_size or not bool(t2d[draft_ids].all()):
        raise DraftFormatError(f"{where}: t2d disagrees with d2t")
    check_aux_layer_ids(cfg.aux_layer_ids, cfg.target_num_layers or None, where)


def read_checkpoint(path: str | Path) -> tuple[dict, DraftConfig]:
    """(tensors, config) of a checkpoint folder, or of a run folder's latest checkpoint; checked."""
    ckpt = resolve_checkpoint(path)
    tensors, cfg_dict = load_draft_weights(ckpt)
    cfg = DraftConfig.from_dict(cfg_dict)
    check_draft_tensors(tensors, cfg, str(ckpt / DRAFT_FILE))
    return tensors, cfg


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_export(
    folder: str | Path, default_aux_layer_ids: list[int] | None = None
) -> tuple[dict, DraftConfig]:
    """(tensors in fp32, config) of an export folder: ours, SpecForge's (the same layout, maybe
    without aux layer ids: `default_aux_layer_ids` then), or the speculators layout; checked."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_export(folder):
        raise FileNotFoundError(
            f"{folder}: not an EAGLE-3 export (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    where = str(folder / CONFIG_FILE)
    try:
        c = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise DraftFormatError(f"{where}: not valid JSON ({e})") from None
    if is_speculators_config(c):
        cfg = config_from_speculators(c, where)
    else:
        cfg = config_from_export(c, where, default_aux_layer_ids)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    tensors.pop("embed_tokens.weight", None)  # other trainers may ship the target's embeddings
    tensors = {k.replace(SPECULATORS_LAYER, "midlayer.", 1): v for k, v in tensors.items()}
    check_draft_tensors(tensors, cfg, str(folder))
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}, cfg


def read_draft(
    path: str | Path, default_aux_layer_ids: list[int] | None = None
) -> tuple[dict, DraftConfig]:
    """(tensors, config) from an export folder, a checkpoint folder or a training run folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"draft {path}: no such folder")
    if is_export(path):
        return read_export(path, default_aux_layer_ids)
    return read_checkpoint(path)


def check_matches_target(cfg: DraftConfig, target, where: str) -> None:
    """The draft must have been trained on this target: same vocabulary, width and aux layers."""
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(
            f"{where}: draft is for a {cfg.vocab_size}-token vocabulary, "
            f"target has {target.vocab_size}"
        )
    if cfg.target_hidden_size != target.hidden_size:
        raise ValueError(
            f"{where}: draft expects target hidden size {cfg.target_hidden_size}, "
            f"target has {target.hidden_size}"
        )
    if cfg.target_num_layers and cfg.target_num_layers != target.num_layers:
        raise ValueError(
            f"{where}: draft was trained on a {cfg.target_num_layers}-layer target, "
            f"this one has {target.num_layers}"
        )
    if list(cfg.aux_layer_ids) != list(target.aux_layer_ids):
        raise ValueError(
            f"{where}: draft reads aux layers {cfg.aux_layer_ids} (0-based outputs), "
            f"the target gives {target.aux_layer_ids}"
        )


def load_weights(draft: Eagle3Draft, tensors: dict, where: str) -> None:
    """Copy stored tensors into `draft`, every one of them and nothing else."""
    missing, unexpected = draft.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the draft (missing {missing}, unexpected {unexpected})"
        )


def draft_from_weights(
    tensors: dict, cfg: DraftConfig, target, where: str = "draft"
) -> Eagle3Draft:
    """An fp32 Eagle3Draft holding `tensors`, for inference on the target's device, sharing the
    target's embeddings."""
    check_matches_target(cfg, target, where)
    draft = Eagle3Draft(cfg)
    load_weights(draft, tensors, where)
    draft.to(target.device).eval().requires_grad_(False)
    draft.attach_target(target.embed_weight().to(torch.float32))
    return draft


def load_draft(path: str | Path, target) -> Eagle3Draft:
    """The draft stored at `path` (export, checkpoint or run folder), ready to decode beside
    `target`."""
    tensors, cfg = read_draft(path)
    return draft_from_weights(tensors, cfg, target, str(path))
