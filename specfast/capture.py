"""`specfast capture`: run the target once over prepared data and store its hidden states in shards
(specfast.shards), so training can run many epochs from disk without the target.

The shard folder is self-contained: besides the shards and manifest it holds the draft vocabulary
(`vocab.safetensors`) and `prepared_meta.json` of the data it came from. Samples are cut to
`--batch-tokens` (the training token budget), and samples with no assistant token within it are left
out — exactly the samples, in the same order, that online training draws from, so offline and online
runs with the same seed see the same batches. Killed at any moment, it resumes where it stopped.
For a vision or speech target the shards hold every position (media placeholders included) and
`OUT/text_target/` its text side (specfast.targets.multimodal.write_text_view): offline training
(`--target OUT/text_target`) needs neither the media nor the media encoder.

Under torchrun with N ranks, the target forwards of the one-process capture (the unshuffled plan's
batches) are cut into N consecutive runs; rank r captures run r into `OUT/rank-r/`, resumable on its
own. When every rank is done, rank 0 links their shards into OUT in rank order and writes one
manifest, atomically: the same samples, in the same order, as a one-process capture. A resumed
distributed capture needs the same number of ranks (recorded in `OUT/ranks.json`).
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from pathlib import Path

from tqdm import tqdm

from specfast.conventions import AUX_LAYER_CONVENTION, hidden_dtype
from specfast.data.prepared import VOCAB_FILE, PreparedData
from specfast.fileio import atomic_path, atomic_write_json
from specfast.pipeline import TargetRows, online_plan
from specfast.shards import ShardWriter
from specfast.shards.format import MANIFEST, load_manifest
from specfast.shards.writer import merge_captures
from specfast.targets import load_target
from specfast.train import distributed

log = logging.getLogger("specfast")

RANKS_FILE = "ranks.json"
# The only collective waits for the slowest rank to finish its share: allow a long capture.
CAPTURE_TIMEOUT = datetime.timedelta(days=7)


def rank_split(plan, world_size: int) -> list[int]:
    """Sample positions [p_0 = 0, p_1, ..., p_N = all]: rank r captures positions p_r..p_{r+1} of
    the plan's unshuffled order, a run of whole batches of the one-process capture."""
    bounds = [0]
    for ids in plan.epoch_batches(0, 0):
        bounds.append(bounds[-1] + len(ids))
    n = len(bounds) - 1
    return [bounds[(r * n) // world_size] for r in range(world_size)] + [bounds[-1]]


def batches_between(plan, start: int, end: int):
    """The plan's unshuffled batches from sample position `start`, cut off at `end`."""
    pos = start
    for ids in plan.epoch_batches(0, start):
        if pos >= end:
            return
        yield ids[: end - pos]
        pos += len(ids)


def capture_config(target, target_name: str, data_dir, data, batch_tokens: int, dtype: str):
    return {
        "target": target_name,
        "aux_layer_ids": target.aux_layer_ids,
        "aux_layer_convention": AUX_LAYER_CONVENTION,
        "hidden_size": target.hidden_size,
        "tokenizer_hash": target.tokenizer_hash(),
        "dtype": dtype,
        "extra": {
            "prepared": str(Path(data_dir).resolve()),
            "batch_tokens": batch_tokens,
            "draft_vocab_size": data.vocab.size,
            "target_vocab_size": target.vocab_size,
        },
    }


def write_part(source, plan, out: Path, config, shard_tokens, start, end, store, bar) -> None:
    """Capture sample positions start..end of the plan into the shard folder `out` (resumed)."""
    with ShardWriter(out, config, shard_tokens=shard_tokens) as writer:
        done = writer.num_samples_done
        bar.update(done)
        for raw in source.stream(batches_between(plan, start + done, end)):
            bounds = raw["offsets"].tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                sample = {
                    "input_ids": raw["input_ids"][a:b],
                    "loss_mask": raw["loss_mask"][a:b],
                    "aux_hidden": raw["aux_hidden"][a:b].to(store),
                    "final_hidden": raw["final_hidden"][a:b].to(store),
                    "target_argmax": raw["target_argmax"][a:b],
                }
                if "positions" in raw:  # an mRoPE target: the draft's positions come with it
                    sample["positions"] = raw["positions"][a:b]
                writer.add(sample)
            bar.update(len(bounds) - 1)


def capture(
    data_dir: str | Path,
    out: str | Path,
    target_name: str,
    batch_tokens: int = 2048,
    dtype: str = "bfloat16",
    device: str = "cpu",
    shard_tokens: int | None = None,
    aux_layer_ids: list[int] | None = None,
    progress: bool = True,
) -> dict:
    store = hidden_dtype(dtype)
    data = PreparedData.load(data_dir)
    out = Path(out)
    ranks, dev = distributed.setup(device, timeout=CAPTURE_TIMEOUT)
    try:
        check_resume(out, ranks.world_size)
        target = load_target(target_name, device=str(dev), aux_layer_ids=aux_layer_ids)
        source = TargetRows(data, target, batch_tokens)  # checks the data against the target
        # The training plan's samples in their unshuffled order; consecutive samples up to the
        # token budget share one target forward.
        plan = online_plan(data, batch_tokens, seed=0, shuffle=False)
        total = len(plan.eligible)
        config = capture_config(target, target_name, data_dir, data, batch_tokens, dtype)
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
            # The vocabulary and provenance travel with the shards.
            if not (out / VOCAB_FILE).exists():
                with atomic_path(out / VOCAB_FILE) as tmp:
                    shutil.copyfile(data.root / VOCAB_FILE, tmp)
            atomic_write_json(out / "prepared_meta.json", data.meta)
            _write_text_view(target, out)
        split = rank_split(plan, ranks.world_size)
        start, end = split[ranks.rank], split[ranks.rank + 1]
        part = out / f"rank-{ranks.rank}" if ranks.distributed else out
        bar = tqdm(
            total=end - start,
            desc="capture",
            unit="sample",
            disable=not (progress and ranks.is_main),
        )
        if not (ranks.distributed and is_merged(out)):
            write_part(source, plan, part, config, shard_tokens, start, end, store, bar)
        bar.close()
        if ranks.distributed:
            distributed.barrier()  # every rank's part is complete
            if ranks.is_main:
                merge_parts(out, ranks.world_size)
            distributed.barrier()
    finally:
        distributed.teardown()
    log.info("captured %d samples to %s", total, out)
    return {"samples": total, "out": str(out)}


def _write_text_view(target, out: Path) -> None:
    """A vision/speech target's text side beside its shards, for offline training (the shards
    hold every position's hidden states, media positions included: training never reads the
    media again)."""
    from specfast.targets.multimodal import TEXT_VIEW, MultimodalTarget, write_text_view

    if isinstance(target, MultimodalTarget):
        view = write_text_view(target, out / TEXT_VIEW)
        log.info("offline training from these shards: --target %s", view)


def is_merged(out: Path) -> bool:
    return (out / MANIFEST).is_file() and load_manifest(out)["complete"]


def check_resume(out: Path, world_size: int) -> None:
    """A distributed capture resumes with the number of ranks it started with, and never on top
    of a one-process capture in progress."""
    if world_size == 1:
        if (out / RANKS_FILE).is_file() and not is_merged(out):
            saved = json.loads((out / RANKS_FILE).read_text())["world_size"]
            raise ValueError(
                f"{out / RANKS_FILE}: this capture was started by {saved} ranks; resume it with "
                f"torchrun --nproc_per_node {saved} (or capture into a new folder)"
            )
        return
    if (out / MANIFEST).is_file() and not (out / RANKS_FILE).is_file():
        if not load_manifest(out)["complete"]:
            raise ValueError(
                f"{out}: a one-process capture in progress; resume it with one process"
            )
    if (out / RANKS_FILE).is_file():
        saved = json.loads((out / RANKS_FILE).read_text())["world_size"]
        if saved != world_size:
            raise ValueError(
                f"{out / RANKS_FILE}: this capture was started by {saved} ranks; resume it with "
                f"torchrun --nproc_per_node {saved} (or capture into a new folder)"
            )
    distributed.barrier()  # every rank has checked before rank 0 records the split
    if distributed.ranks_from_env().is_main and not (out / RANKS_FILE).is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RANKS_FILE, {"world_size": world_size})


def merge_parts(out: Path, world_size: int) -> None:
    parts = [out / f"rank-{r}" for r in range(world_size)]
    if not is_merged(out):
        merged = merge_captures(parts, out)
        counts = [load_manifest(p)["totals"]["samples"] for p in parts]
        log.info(
            "merged %d ranks' captures (%s samples) into %d shards",
            world_size,
            "+".join(map(str, counts)),
            merged["totals"]["shards"],
        )
    for p in parts:  # the manifest in `out` now lists the shards: the parts' links can go
        shutil.rmtree(p, ignore_errors=True)
    (out / RANKS_FILE).unlink(missing_ok=True)
