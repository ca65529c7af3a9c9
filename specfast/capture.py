"""`specfast capture`: run the target once over prepared data and store its hidden states in shards
(specfast.shards), so training can run many epochs from disk without the target.

The shard folder is self-contained: besides the shards and manifest it holds the draft vocabulary
(`vocab.safetensors`) and `prepared_meta.json` of the data it came from. Samples are cut to
`--batch-tokens` (the training token budget), and samples with no assistant token within it are left
out — exactly the samples, in the same order, that online training draws from, so offline and online
runs with the same seed see the same batches. Killed at any moment, it resumes where it stopped.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tqdm import tqdm

from specfast.conventions import AUX_LAYER_CONVENTION, hidden_dtype
from specfast.data.prepared import VOCAB_FILE, PreparedData
from specfast.fileio import atomic_path, atomic_write_json
from specfast.pipeline import TargetRows, online_plan
from specfast.shards import ShardWriter
from specfast.targets import load_target

log = logging.getLogger("specfast")


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
    target = load_target(target_name, device=device, aux_layer_ids=aux_layer_ids)
    source = TargetRows(data, target, batch_tokens)  # checks the data against the target
    # The training plan's samples in their unshuffled order; consecutive samples up to the token
    # budget share one target forward.
    plan = online_plan(data, batch_tokens, seed=0, shuffle=False)
    total = len(plan.eligible)
    out = Path(out)
    config = {
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
    with ShardWriter(out, config, shard_tokens=shard_tokens) as writer:
        # The vocabulary and provenance travel with the shards (written before any shard is
        # committed).
        if not (out / VOCAB_FILE).exists():
            with atomic_path(out / VOCAB_FILE) as tmp:
                shutil.copyfile(data.root / VOCAB_FILE, tmp)
        atomic_write_json(out / "prepared_meta.json", data.meta)
        done = writer.num_samples_done
        bar = tqdm(total=total, initial=done, desc="capture", unit="sample", disable=not progress)
        for raw in source.stream(plan.epoch_batches(0, done)):
            bounds = raw["offsets"].tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                writer.add(
                    {
                        "input_ids": raw["input_ids"][a:b],
                        "loss_mask": raw["loss_mask"][a:b],
                        "aux_hidden": raw["aux_hidden"][a:b].to(store),
                        "final_hidden": raw["final_hidden"][a:b].to(store),
                        "target_argmax": raw["target_argmax"][a:b],
                    }
                )
            bar.update(len(bounds) - 1)
        bar.close()
    log.info("captured %d samples to %s", total, out)
    return {"samples": total, "out": str(out)}
