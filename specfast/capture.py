"""`specfast capture`: run the target once over prepared data and store its hidden states in shards
(specfast/shards.py), so training can run many epochs from disk without the target.

The shard folder is self-contained: besides the shards and manifest it holds the draft vocabulary
(`vocab.safetensors`) and `prepared_meta.json` of the data it came from. Samples are cut to
`--batch-tokens` (the training token budget), and samples with no assistant token within it are left
out — exactly the samples, in the same order, that online training draws from, so offline and online
runs with the same seed see the same batches. Killed at any moment, it resumes where it stopped.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from specfast.data.prepared import PreparedData, atomic_write_bytes
from specfast.shards import AUX_LAYER_CONVENTION, ShardWriter
from specfast.targets import load_target
from specfast.train.batches import pack, supervised_within

log = logging.getLogger("specfast")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def capture(data_dir: str | Path, out: str | Path, target_name: str, batch_tokens: int = 2048,
            dtype: str = "bfloat16", device: str = "cpu", shard_tokens: int | None = None,
            aux_layer_ids: list[int] | None = None, progress: bool = True) -> dict:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    from specfast.train.trainer import check_data_matches_target

    data = PreparedData.load(data_dir)
    target = load_target(target_name, device=device, aux_layer_ids=aux_layer_ids)
    check_data_matches_target(data, target)
    order = supervised_within(data, batch_tokens)
    lengths = [min(int(n), batch_tokens) for n in data.lengths()]  # as stored: cut to the budget
    out = Path(out)
    config = {
        "target": target_name, "aux_layer_ids": target.aux_layer_ids, "aux_layer_convention": AUX_LAYER_CONVENTION,
        "hidden_size": target.hidden_size, "tokenizer_hash": target.tokenizer_hash(), "dtype": dtype,
        "extra": {"prepared": str(Path(data_dir).resolve()), "batch_tokens": batch_tokens,
                  "draft_vocab_size": data.vocab.size, "target_vocab_size": target.vocab_size},
    }
    with ShardWriter(out, config, shard_tokens=shard_tokens) as writer:
        # The vocabulary and provenance travel with the shards (written before any shard is committed).
        if not (out / "vocab.safetensors").exists():
            shutil.copyfile(data.root / "vocab.safetensors", out / ".vocab.tmp")
            (out / ".vocab.tmp").replace(out / "vocab.safetensors")
        atomic_write_bytes(out / "prepared_meta.json", json.dumps(data.meta, indent=2).encode())
        done = writer.num_samples_done
        todo = order[done:]
        bar = tqdm(total=len(order), initial=done, desc="capture", unit="sample", disable=not progress)
        i = 0
        while i < len(todo):
            # Consecutive samples up to the token budget share one target forward.
            group, used = [], 0
            while i < len(todo):
                n = lengths[todo[i]]
                if group and used + n > batch_tokens:
                    break
                group.append(int(todo[i]))
                used += n
                i += 1
            ids, labels, doc_ids, _ = pack([data.sample(j) for j in group], batch_tokens)
            res = target.forward_packed(ids, doc_ids)
            start = 0
            for j in group:
                n = lengths[j]
                sl = slice(start, start + n)
                writer.add({"input_ids": ids[sl], "loss_mask": labels[sl],
                            "aux_hidden": res.aux_hidden[sl].to(DTYPES[dtype]),
                            "final_hidden": res.final_hidden[sl].to(DTYPES[dtype]),
                            "target_argmax": res.argmax[sl]})
                start += n
            bar.update(len(group))
        bar.close()
    log.info("captured %d samples to %s", len(order), out)
    return {"samples": len(order), "out": str(out)}


def register(sub) -> None:
    s = sub.add_parser("capture", help="store the target's hidden states in shards for offline training",
                       description="Run the target over a prepared dataset once and write checksummed, "
                                   "safetensors-compatible shards; `specfast train --data SHARDS` then trains "
                                   "without the target's decoder layers. Resumes after a kill.")
    s.add_argument("--data", required=True, help="a `specfast prepare` output folder")
    s.add_argument("--out", required=True, help="shard folder (resumed if it holds a partial capture)")
    s.add_argument("--target", default="smollm2", help="target folder or embedded name (default smollm2)")
    s.add_argument("--batch-tokens", type=int, default=2048,
                   help="training token budget: samples are cut to it (use the same value in train)")
    s.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="stored hidden-state dtype")
    s.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default ~256 MiB)")
    s.add_argument("--device", default="cpu", help="device for the target (default cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a) -> int:
        r = capture(a.data, a.out, a.target, a.batch_tokens, a.dtype, a.device, a.shard_tokens,
                    progress=not a.no_progress)
        print(json.dumps(r))
        return 0

    s.set_defaults(func=run)
