"""What every source format shares: the per-sample error, the only way a pickled file is opened,
file ordering, and the shape checks that turn a peer's tensors into one sample.

A sample, as every reader returns it (CPU tensors)::

    input_ids  int64 [L]         token ids
    loss_mask  bool  [L]         True where the token is supervised (an assistant token)
    aux_hidden float [L, K*H]    the K aux hidden states, in aux-layer order
    final_hidden float [L, H]    the target's last hidden state *after* its final norm
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
from pathlib import Path

import torch


class SampleError(ValueError):
    """One source file is unusable; the message names the file and what is wrong."""


def natural_key(path: Path) -> list:
    """Sort key that orders `data_2` before `data_10` (peers number files without padding)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def list_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under `root` (recursively) ending in one of `suffixes`, in natural order."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    found = [p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes)]
    return sorted(found, key=natural_key)


def load_pickled(path: Path) -> dict:
    """A `torch.save` file (optionally gzipped), opened with `weights_only=True` only: tensors,
    lists and dicts load, arbitrary objects are refused (a pickle can run code)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                obj = torch.load(io.BytesIO(f.read()), weights_only=True, map_location="cpu")
        else:
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SampleError(
            f"{path}: refused: not loadable with torch.load(weights_only=True) ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SampleError(f"{path}: not a readable torch.save file ({e})") from None
    if not isinstance(obj, dict):
        raise SampleError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def take(d: dict, keys: tuple[str, ...], path: Path) -> torch.Tensor:
    """The first of `keys` present in `d`, as a tensor (keys: the names peers use for it)."""
    for k in keys:
        if k in d:
            if not isinstance(d[k], torch.Tensor):
                raise SampleError(f"{path}: {k!r} is a {type(d[k]).__name__}, not a tensor")
            return d[k]
    raise SampleError(f"{path}: missing key {' or '.join(map(repr, keys))} (has {sorted(d)})")


def tokens(t: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """[L] or [1, L] -> [L]."""
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise SampleError(f"{path}: {name} has shape {list(t.shape)}, expected [L] or [1, L]")
    if t.is_floating_point() or t.is_complex():
        raise SampleError(f"{path}: {name} has dtype {t.dtype}, expected integers")
    return t


def hidden(t: torch.Tensor, name: str, width: int, path: Path) -> torch.Tensor:
    """[L, width] or [1, L, width] -> [L, width], floating point. (NaN and inf are caught by the
    shard writer, whose C++ scan is far faster than torch's on bf16.)"""
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2 or t.shape[1] != width:
        raise SampleError(
            f"{path}: {name} has shape {list(t.shape)}, expected [L, {width}] or [1, L, {width}]"
        )
    if not t.is_floating_point():
        raise SampleError(f"{path}: {name} has dtype {t.dtype}, expected floating point")
    return t


def sample(
    path: Path,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    aux: torch.Tensor,
    final: torch.Tensor,
    vocab_size: int,
) -> dict:
    """The checked sample: equal lengths, ids inside the vocabulary, a 0/1 loss mask."""
    lengths = {
        "input_ids": len(input_ids),
        "loss_mask": len(loss_mask),
        "aux hidden": len(aux),
        "final hidden": len(final),
    }
    if len(set(lengths.values())) != 1:
        raise SampleError(f"{path}: length mismatch ({lengths})")
    ids = input_ids.long()
    if bool((ids < 0).any()) or bool((ids >= vocab_size).any()):
        raise SampleError(
            f"{path}: token ids {int(ids.min())}..{int(ids.max())} outside the target's "
            f"vocabulary [0, {vocab_size})"
        )
    if loss_mask.dtype != torch.bool and not bool(((loss_mask == 0) | (loss_mask == 1)).all()):
        raise SampleError(f"{path}: loss_mask holds values other than 0 and 1")
    return {
        "input_ids": ids,
        "loss_mask": loss_mask.bool(),
        "aux_hidden": aux,
        "final_hidden": final,
    }
