"""The prepared dataset on disk, written by `specfast prepare` and read by the trainer:

    DIR/data.safetensors   input_ids int32 [N], loss_mask uint8 [N], offsets int64 [S + 1]
    DIR/vocab.safetensors  draft_ids int64 [V_draft], d2t int64 [V_draft], t2d bool [V_target],
                           counts int64 [V_target] (supervised label counts)
    DIR/heldout.jsonl      conversations kept out of training, for `specfast eval`
    DIR/meta.json          what produced it, counts, coverage; written last, so its presence means complete
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .vocab import DraftVocab

FORMAT = "specfast-prepared-v1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class PreparedData:
    root: Path
    input_ids: torch.Tensor  # int32 [N]
    loss_mask: torch.Tensor  # bool [N]
    offsets: torch.Tensor  # int64 [S + 1]
    vocab: DraftVocab
    meta: dict

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> np.ndarray:
        return (self.offsets[1:] - self.offsets[:-1]).numpy()

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.loss_mask[a:b]

    @staticmethod
    def load(root: str | Path) -> "PreparedData":
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root}: not a prepared dataset (no meta.json; run `specfast prepare` first, "
                                    "or it did not finish)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        data = load_file(str(root / "data.safetensors"))
        voc = load_file(str(root / "vocab.safetensors"))
        offsets = data["offsets"]
        n = data["input_ids"].numel()
        if offsets.numel() < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"{root / 'data.safetensors'}: offsets do not describe {n} tokens")
        vocab = DraftVocab(voc["draft_ids"], int(voc["t2d"].numel()), float(meta["vocab"]["coverage"]))
        return PreparedData(root, data["input_ids"], data["loss_mask"].bool(), offsets, vocab, meta)

    @staticmethod
    def save(root: Path, input_ids: np.ndarray, loss_mask: np.ndarray, lengths: list[int], vocab: DraftVocab,
             counts: np.ndarray, meta: dict) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta lands
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        atomic_save_safetensors({
            "input_ids": torch.from_numpy(input_ids.astype(np.int32)),
            "loss_mask": torch.from_numpy(loss_mask.astype(np.uint8)),
            "offsets": torch.from_numpy(offsets),
        }, root / "data.safetensors")
        atomic_save_safetensors({
            "draft_ids": vocab.draft_ids, "d2t": vocab.d2t, "t2d": vocab.t2d,
            "counts": torch.from_numpy(counts.astype(np.int64)),
        }, root / "vocab.safetensors")
        meta = {"format": FORMAT, **meta}
        atomic_write_bytes(root / "meta.json", json.dumps(meta, indent=2).encode())
