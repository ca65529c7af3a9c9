"""The prepared dataset on disk, written by `specfast prepare` and read by the trainer:

    DIR/data.safetensors   input_ids int32 [N], loss_mask uint8 [N], offsets int64 [S + 1]
    DIR/vocab.safetensors  draft_ids int64 [V_draft], d2t int64 [V_draft], t2d bool [V_target],
                           counts int64 [V_target] (supervised label counts)
    DIR/heldout.jsonl      conversations kept out of training, for `specfast eval`
    DIR/meta.json          what produced it, counts, coverage; written last, so its presence means
                           complete
    DIR/media.json, media/ for vision/speech targets only: each sample's images or audio clips,
                           stored by content hash (specfast.data.media)

It is one of the two sample sources of the batching pipeline (specfast.pipeline): `lengths()` for
the batch plan, `read()` for a batch's tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from specfast.fileio import atomic_save_safetensors, atomic_write_json

from .vocab import DraftVocab

FORMAT = "specfast-prepared-v1"
VOCAB_FILE = "vocab.safetensors"


def read_vocab(folder: Path, coverage: float = float("nan")) -> DraftVocab:
    """The draft vocabulary stored beside prepared data (and copied into shard folders)."""
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no draft vocabulary (run `specfast prepare`)")
    voc = load_file(str(path))
    return DraftVocab(voc["draft_ids"], int(voc["t2d"].numel()), coverage)


def write_vocab(folder: Path, vocab: DraftVocab, counts: np.ndarray) -> None:
    atomic_save_safetensors(
        {
            "draft_ids": vocab.draft_ids,
            "d2t": vocab.d2t,
            "t2d": vocab.t2d,
            "counts": torch.from_numpy(counts.astype(np.int64)),
        },
        Path(folder) / VOCAB_FILE,
    )


@dataclass
class PreparedData:
    root: Path
    input_ids: torch.Tensor  # int32 [N]
    loss_mask: torch.Tensor  # bool [N]
    offsets: torch.Tensor  # int64 [S + 1]
    vocab: DraftVocab
    meta: dict
    media: object = None  # specfast.data.media.MediaTable, for data with images / audio

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def lengths(self) -> np.ndarray:
        return (self.offsets[1:] - self.offsets[:-1]).numpy()

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[a:b], self.loss_mask[a:b]

    def read(self, indices, batch_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Samples `indices`, each cut to `batch_tokens` tokens, back to back: input_ids int64 [T],
        loss_mask bool [T], offsets int64 [B + 1] (sample boundaries in the row)."""
        parts = [self.sample(int(i)) for i in indices]
        ids = [p[0][:batch_tokens].long() for p in parts]
        mask = [p[1][:batch_tokens].bool() for p in parts]
        offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([x.numel() for x in ids]), 0, out=offsets[1:])
        if self.media is None:
            return torch.cat(ids), torch.cat(mask), offsets
        return (
            self._with_media(indices, parts, batch_tokens, torch.cat(ids)),
            torch.cat(mask),
            offsets,
        )

    def _with_media(self, indices, parts, batch_tokens: int, ids: torch.Tensor) -> torch.Tensor:
        """`ids` with the batch's media attached (specfast.data.media); a sample with media is
        never cut to the budget."""
        from .media import BatchMedia, MediaStore, attach

        for i, p in zip(indices, parts):
            if int(i) in self.media.samples and p[0].numel() > batch_tokens:
                raise ValueError(
                    f"{self.root}: sample {int(i)} ({self.media.sources.get(int(i), '')}) has "
                    f"media and {p[0].numel()} tokens, more than --batch-tokens {batch_tokens}: "
                    "a sample's media are never cut from its text; use --batch-tokens >= "
                    f"{self.meta.get('media', {}).get('max_sample_tokens', p[0].numel())}"
                )
        return attach(ids, BatchMedia.from_table(self.media, MediaStore(self.root), indices))

    @staticmethod
    def load(root: str | Path) -> "PreparedData":
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{root}: not a prepared dataset (no meta.json; run "
                "`specfast prepare` first, or it did not finish)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        data = load_file(str(root / "data.safetensors"))
        offsets = data["offsets"]
        n = data["input_ids"].numel()
        if (
            offsets.numel() < 1
            or int(offsets[0]) != 0
            or int(offsets[-1]) != n
            or bool((offsets[1:] < offsets[:-1]).any())
        ):
            raise ValueError(f"{root / 'data.safetensors'}: offsets do not describe {n} tokens")
        vocab = read_vocab(root, float(meta["vocab"]["coverage"]))
        from .media import MediaTable

        return PreparedData(
            root,
            data["input_ids"],
            data["loss_mask"].bool(),
            offsets,
            vocab,
            meta,
            MediaTable.load(root),
        )

    @staticmethod
    def save(
        root: Path,
        input_ids: np.ndarray,
        loss_mask: np.ndarray,
        lengths: list[int],
        vocab: DraftVocab,
        counts: np.ndarray,
        meta: dict,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta lands
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        atomic_save_safetensors(
            {
                "input_ids": torch.from_numpy(input_ids.astype(np.int32)),
                "loss_mask": torch.from_numpy(loss_mask.astype(np.uint8)),
                "offsets": torch.from_numpy(offsets),
            },
            root / "data.safetensors",
        )
        write_vocab(root, vocab, counts)
        atomic_write_json(root / "meta.json", {"format": FORMAT, **meta})
