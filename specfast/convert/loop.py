"""The conversion loop shared by every source format: read each sample file in order, check it,
add the target's argmax, write it through the shard writer; skip or stop on a bad file; resume
after a kill; write the draft vocabulary and a report at the end."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specfast.conventions import AUX_LAYER_CONVENTION, check_aux_layer_ids, hidden_dtype
from specfast.data.prepared import VOCAB_FILE, read_vocab, write_vocab
from specfast.data.vocab import DraftVocab, select_draft_vocab
from specfast.fileio import atomic_write_json
from specfast.shards import ShardWriter

from .angelslim import AngelSlimSource
from .common import SampleError
from .specforge import TorchDictSource
from .speculators import SpeculatorsSource

log = logging.getLogger("specfast")

SOURCES = {
    "specforge": TorchDictSource,
    "angelslim": AngelSlimSource,
    "speculators": SpeculatorsSource,
}
SKIPPED_FILE = "convert_skipped.json"  # files skipped so far: how a resumed run finds its place
REPORT_FILE = "convert_report.json"
DEFAULT_DRAFT_VOCAB = 8192


def rms_norm_fn(weight: torch.Tensor, eps: float):
    """The target's final RMSNorm (Llama-style: weight * x / rms(x)), in fp32."""
    w = weight.float()

    def norm(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    return norm


def open_source(fmt: str, src: Path, target):
    if fmt not in SOURCES:
        raise ValueError(f"--from must be one of {', '.join(SOURCES)}, not {fmt!r}")
    h, v = target.hidden_size, target.vocab_size
    if fmt != "speculators":
        return SOURCES[fmt](src, h, v)
    weight = target.final_norm_weight()
    if weight is None:
        raise ValueError(
            f"target {target.name}: no plain RMSNorm final norm found; speculators stores the "
            "last hidden state before it, so it cannot be converted for this target"
        )
    eps = float(getattr(target.hf_config, "rms_norm_eps", 1e-6))
    return SpeculatorsSource(src, h, v, rms_norm_fn(weight, eps))


def target_argmax(final: torch.Tensor, loss_mask: torch.Tensor, lm_head: torch.Tensor):
    """The target's full-vocabulary pick where the next token is supervised, -1 elsewhere (what
    `specfast capture` stores)."""
    from specfast.kernels import full_vocab_argmax

    out = torch.full((len(final),), -1, dtype=torch.int64)
    rows = torch.zeros(len(final), dtype=torch.bool)
    rows[:-1] = loss_mask[1:]
    if bool(rows.any()):
        out[rows] = full_vocab_argmax(final[rows].float(), lm_head)
    return out


def convert(
    src: str | Path,
    fmt: str,
    out: str | Path,
    target: str = "smollm2",
    dtype: str = "bfloat16",
    on_error: str = "stop",
    layer_ids: list[int] | None = None,
    vocab: str | Path | None = None,
    draft_vocab_size: int | None = None,
    shard_tokens: int | None = None,
    progress: bool = True,
    argmax: bool = True,
) -> dict:
    """Convert the sample files of `src` (a `fmt` folder) into specfast shards in `out`.

    `layer_ids`: the aux layers the source captured, in the source's own convention (default:
    EAGLE-3's, as that tool spells them). `vocab`: a draft vocabulary to use (a prepared or
    shard folder, its vocab.safetensors, or a SpecForge vocab-mapping `.pt` with `d2t`);
    otherwise the `draft_vocab_size` most frequent supervised tokens of the converted data.
    `argmax`: store the target's full-vocabulary argmax (2·V·H FLOPs per supervised token, most
    of a CPU conversion's time); without it training computes it every epoch instead.
    """
    from specfast.targets import resolve_target_path
    from specfast.targets.heads import HeadsOnlyTarget

    if on_error not in ("skip", "stop"):
        raise ValueError(f"--on-error must be skip or stop, not {on_error!r}")
    store = hidden_dtype(dtype)
    src, out = Path(src), Path(out)
    path = resolve_target_path(target)
    tgt = HeadsOnlyTarget(path, [0, 1, 2], "cpu", torch.float32, target)
    source = open_source(fmt, src, tgt)
    given = list(layer_ids) if layer_ids else source.default_layer_ids(tgt.num_layers)
    ours = source.to_ours(given)
    check_aux_layer_ids(ours, tgt.num_layers, f"--layer-ids {given} ({source.layer_convention})")
    if not source.files:
        raise FileNotFoundError(f"{src}: no {fmt} sample files found")
    chosen = _read_vocab_arg(vocab, tgt.vocab_size) if vocab else None
    config = {
        "target": target,
        "aux_layer_ids": ours,
        "aux_layer_convention": AUX_LAYER_CONVENTION,
        "hidden_size": tgt.hidden_size,
        "tokenizer_hash": tgt.tokenizer_hash(),
        "dtype": dtype,
        "extra": {
            "converted_from": {
                "format": fmt,
                "path": str(src.resolve()),
                "layer_ids": given,
                "layer_convention": source.layer_convention,
            },
            "target_vocab_size": tgt.vocab_size,
        },
    }
    lm_head = tgt.lm_head_weight().float()
    skipped_path = out / SKIPPED_FILE
    t0, nbytes, new = time.perf_counter(), 0, 0
    with ShardWriter(out, config, shard_tokens=shard_tokens) as writer:
        skipped = json.loads(skipped_path.read_text()) if skipped_path.exists() else {}
        start = _resume_position(source.files, skipped, writer.num_samples_done, src)
        bar = tqdm(
            total=len(source.files),
            initial=start,
            desc="convert",
            unit="file",
            disable=not progress,
        )
        for file in source.files[start:]:
            try:
                s = source.read(file)
                if argmax:
                    s["target_argmax"] = target_argmax(s["final_hidden"], s["loss_mask"], lm_head)
                try:
                    writer.add(s)
                except ValueError as e:  # e.g. a value that overflows the stored dtype
                    raise SampleError(f"{file}: {e}") from None
            except SampleError as e:
                if on_error == "stop":
                    raise
                log.warning("%s; skipped", e)
                skipped[_rel(file, src)] = str(e)
                atomic_write_json(skipped_path, skipped)  # before any later sample is committed
            else:
                nbytes += file.stat().st_size
                new += 1
            bar.update(1)
        bar.close()
    seconds = time.perf_counter() - t0
    manifest = writer.manifest
    counts = _label_counts(out, manifest, tgt.vocab_size)
    if chosen is None:
        size = min(draft_vocab_size or DEFAULT_DRAFT_VOCAB, tgt.vocab_size)
        chosen = select_draft_vocab(counts, size)
    write_vocab(out, chosen, counts)
    total = int(counts.sum())
    report = {
        "out": str(out),
        "from": fmt,
        "samples": manifest["totals"]["samples"],
        "tokens": manifest["totals"]["tokens"],
        "skipped": len(skipped),
        "skipped_files": skipped,
        "aux_layer_ids": ours,
        "draft_vocab_size": chosen.size,
        "coverage": float(counts[chosen.draft_ids.numpy()].sum() / total) if total else 0.0,
        "converted_now": new,
        "seconds": round(seconds, 3),
        "samples_per_s": round(new / seconds, 2) if seconds > 0 else None,
        "source_gb_per_s": round(nbytes / seconds / 1e9, 4) if seconds > 0 else None,
        "hidden_dtype": str(store).removeprefix("torch."),
    }
    atomic_write_json(out / REPORT_FILE, report)
    log.info(
        "converted %d samples (%d skipped) from %s to %s",
        report["samples"],
        len(skipped),
        src,
        out,
    )
    return report


def _rel(file: Path, src: Path) -> str:
    return str(file.relative_to(src)) if src.is_dir() else file.name


def _resume_position(files: list[Path], skipped: dict, done: int, src: Path) -> int:
    """Index of the first file after the `done` committed samples (skipped files hold none)."""
    kept = pos = 0
    while kept < done:
        if pos >= len(files):
            raise ValueError(f"{src}: holds fewer sample files than the shards being resumed")
        if _rel(files[pos], src) not in skipped:
            kept += 1
        pos += 1
    return pos


def _label_counts(out: Path, manifest: dict, vocab_size: int) -> np.ndarray:
    """How often each target token is a supervised label in the written shards."""
    from safetensors import safe_open

    counts = np.zeros(vocab_size, dtype=np.int64)
    for entry in manifest["shards"]:
        with safe_open(str(out / entry["file"]), "pt") as f:
            ids, mask = f.get_tensor("input_ids"), f.get_tensor("loss_mask")
        counts += np.bincount(ids[mask].numpy().astype(np.int64), minlength=vocab_size)
    return counts


def _read_vocab_arg(vocab: str | Path, vocab_size: int) -> DraftVocab:
    """A draft vocabulary from a specfast folder / vocab.safetensors, or a SpecForge `.pt`."""
    p = Path(vocab)
    if p.is_dir() or p.name == VOCAB_FILE:
        v = read_vocab(p if p.is_dir() else p.parent)
        if v.target_vocab_size != vocab_size:
            raise ValueError(
                f"{p}: vocabulary for {v.target_vocab_size} tokens, target has {vocab_size}"
            )
        return v
    from .common import load_pickled

    d = load_pickled(p)
    if not isinstance(d.get("d2t"), torch.Tensor):
        raise ValueError(f"{p}: no d2t tensor (expected a SpecForge vocab mapping)")
    d2t = d["d2t"].long()
    ids = torch.arange(len(d2t)) + d2t
    if bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 or int(ids[-1]) >= vocab_size:
        raise ValueError(f"{p}: d2t does not map to ascending target ids in [0, {vocab_size})")
    return DraftVocab(ids, vocab_size, float("nan"))
