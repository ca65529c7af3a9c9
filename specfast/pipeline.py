"""The batching pipeline: one plan, two sample sources, one assembler.

    BatchPlan (specfast.data.plan)  which samples form each batch, epoch after epoch
        │ sample indices
        ▼
    source.stream(batches)          TargetRows: prepared data, the target runs on each packed row
        │ raw batch dicts             (or its outputs come from a TargetOutputCache, epoch 2 on)
        │                           ShardRows:  hidden-state shards, read ahead by the C++ reader
        ▼
    assemble_batch()                a PackedBatch on the training device
        │
        ▼
    Batches.next()                  what the trainer and capture call; state_dict = the plan's

Both sources yield the same dict per batch (CPU or device tensors): `sample_ids` [B], `offsets`
[B+1] (sample boundaries in the row), `input_ids` [T], `loss_mask` [T], `aux_hidden` [T, 3H],
`final_hidden` [T, H] (after the target's final norm) and, where known, `target_argmax` [T].
Online and offline runs over the same samples therefore see the same batches.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from specfast.data.plan import BatchPlan
from specfast.data.prepared import PreparedData, read_vocab
from specfast.data.vocab import DraftVocab
from specfast.device import cpu_bf16_is_fast
from specfast.kernels import SplitVocabArgmax
from specfast.ttt import TEACHER_LOGITS_BYTES, PackedBatch, draft_positions

log = logging.getLogger("specfast")


def doc_layout(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Document id and position within the document of every token of a packed row."""
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return doc_ids, torch.arange(int(lengths.sum())) - starts


def check_matches_target(
    where,
    target,
    *,
    source: str,
    tokenizer_hash: str | None = None,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
) -> None:
    """Data (prepared or captured) must come from this target: its tokenizer and shapes."""
    problems = []
    if tokenizer_hash and tokenizer_hash != target.tokenizer_hash():
        problems.append(f"tokenizer {tokenizer_hash}, target's {target.tokenizer_hash()}")
    if vocab_size is not None and vocab_size != target.vocab_size:
        problems.append(f"vocabulary of {vocab_size} tokens, target's {target.vocab_size}")
    if hidden_size is not None and hidden_size != target.hidden_size:
        problems.append(f"hidden size {hidden_size}, target's {target.hidden_size}")
    if problems:
        raise ValueError(
            f"{where}: {source} ({'; '.join(problems)}), which does not match target "
            f"{target.name}; prepare or capture the data for this target"
        )


def teacher_rows(loss_mask: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [T]: the rows whose teacher and full-vocabulary argmax can matter. Row t teaches the
    prediction of token t + 1, which is supervised only if it is an assistant token of the same
    document (see specfast.ttt); the target's argmax elsewhere is never read."""
    rows = torch.zeros_like(loss_mask, dtype=torch.bool)
    rows[:-1] = loss_mask[1:] & (doc_ids[1:] == doc_ids[:-1])
    return rows


class TargetOutputCache:
    """The target's outputs for each sample it has run on (aux and final hidden states, argmax),
    kept in host memory up to `max_bytes`, so that later epochs train without the target forward
    (on 2 CPU cores it is ~70% of an online step). Per sample, not per batch: packing changes every
    epoch, and the target attends within each document only, so a sample's outputs do not depend on
    its neighbours in the row. Once full it keeps what it has; the rest runs through the target. Per
    process: under torchrun each rank holds the samples it ran."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = int(max_bytes), 0
        self.samples: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0

    def get(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(aux [T, 3H], final [T, H], argmax int64 [T]) of samples `idx` back to back, or None
        unless every one of them is held."""
        parts = [self.samples.get(int(i)) for i in idx]
        if any(p is None for p in parts):
            self.misses += 1
            return None
        self.hits += 1
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))

    def put(self, idx: np.ndarray, offsets: torch.Tensor, aux, final, argmax) -> None:
        for i, a, b in zip(idx.tolist(), offsets[:-1].tolist(), offsets[1:].tolist()):
            if i in self.samples:
                continue
            item = (
                aux[a:b].to("cpu", copy=True),
                final[a:b].to("cpu", copy=True),
                argmax[a:b].to("cpu", torch.int32, copy=True),
            )
            size = sum(t.numel() * t.element_size() for t in item)
            if self.bytes + size > self.max_bytes:
                return
            self.samples[i] = item
            self.bytes += size

    def stats(self) -> dict:
        return {
            "samples": len(self.samples),
            "gib": round(self.bytes / 2**30, 3),
            "batches_from_cache": self.hits,
            "batches_through_target": self.misses,
        }


class TargetRows:
    """Online source: samples of a prepared dataset, cut to the token budget, packed into one row
    and run through the target.

    `teacher` (a SplitVocabArgmax over the target's lm_head that keeps the draft vocabulary's
    columns): the rows that can be supervised get their full-vocabulary argmax and their teacher
    logits (`teacher_logits` [T, V_draft], zero elsewhere) from one pass over the lm_head, while
    those logits fit `teacher_bytes`; beyond, the argmax alone, and the trainer forms the teacher
    from the final hidden state.

    `cache` (a TargetOutputCache): batches whose samples it holds skip the target; their teacher
    logits are formed again from the cached final hidden state."""

    def __init__(
        self,
        data: PreparedData,
        target,
        batch_tokens: int,
        teacher: SplitVocabArgmax | None = None,
        teacher_bytes: int = TEACHER_LOGITS_BYTES,
        cache: TargetOutputCache | None = None,
    ):
        check_matches_target(
            data.root,
            target,
            source="prepared data",
            tokenizer_hash=data.meta.get("tokenizer_hash"),
            vocab_size=data.vocab.target_vocab_size,
        )
        self.data, self.target, self.batch_tokens = data, target, batch_tokens
        self.teacher, self.teacher_bytes = teacher, teacher_bytes
        self.cache = cache
        if cache is not None and data.media is not None:
            raise ValueError(
                f"{data.root}: the target output cache is for text data (a multimodal sample's "
                "outputs depend on its media); train without it"
            )

    def lengths(self) -> np.ndarray:
        return self.data.lengths()

    def stream(self, batches: Iterator[np.ndarray]) -> Iterator[dict]:
        for idx in batches:
            ids, mask, offsets = self.data.read(idx, self.batch_tokens)
            doc_ids, _ = doc_layout(offsets.diff())
            rows = teacher_rows(mask, doc_ids)
            fused = self.teacher is not None and (
                int(rows.sum()) * self.teacher.keep_ids.numel() * 4 <= self.teacher_bytes
            )
            raw = {
                "sample_ids": torch.as_tensor(idx),
                "offsets": offsets,
                "input_ids": ids,
                "loss_mask": mask,
            }
            cached = self.cache.get(idx) if self.cache is not None else None
            if cached is not None:
                # Back where the target's outputs would be (the teacher's weight is there too).
                aux, final, argmax = (t.to(self.target.device) for t in cached)
                raw.update(aux_hidden=aux, final_hidden=final, target_argmax=argmax)
                if fused:
                    raw["teacher_logits"] = self._teacher_only(final, rows)
                yield raw
                continue
            argmax_rows = torch.zeros_like(rows) if fused else rows  # fused: argmax below
            out = self.target.forward_packed(ids, doc_ids, argmax_rows)
            raw.update(
                aux_hidden=out.aux_hidden, final_hidden=out.final_hidden, target_argmax=out.argmax
            )
            if fused:
                raw["target_argmax"], raw["teacher_logits"] = self._argmax_and_teacher(out, rows)
            if out.positions is not None:  # an mRoPE target: the draft's positions are its own
                raw["positions"] = out.positions
            if self.cache is not None and out.positions is None:  # mRoPE positions: not kept
                self.cache.put(idx, offsets, out.aux_hidden, out.final_hidden, raw["target_argmax"])
            yield raw

    def _teacher_only(self, final: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The teacher logits of `_argmax_and_teacher` from a cached final hidden state (the
        argmax is cached too)."""
        rows = rows.to(final.device)
        logits = final.new_zeros(rows.numel(), self.teacher.keep_ids.numel(), dtype=torch.float32)
        logits[rows] = self.teacher.kept_logits(final[rows])
        return logits

    def _argmax_and_teacher(self, out, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final = out.final_hidden
        rows = rows.to(final.device)
        argmax = torch.full(rows.shape, -1, dtype=torch.int64, device=final.device)
        logits = final.new_zeros(rows.numel(), self.teacher.keep_ids.numel(), dtype=torch.float32)
        argmax[rows], logits[rows] = self.teacher(final[rows])
        return argmax, logits


class ShardRows:
    """Offline source: samples captured into hidden-state shards (already cut to the token
    budget)."""

    def __init__(self, dataset, batch_tokens: int, device: torch.device):
        self.dataset, self.batch_tokens, self.device = dataset, batch_tokens, device

    def lengths(self) -> np.ndarray:
        return self.dataset.sample_lengths

    def stream(self, batches: Iterator[np.ndarray]):
        from specfast.shards import ShardReader

        return ShardReader(
            self.dataset, batches, self.batch_tokens, pin_memory=self.device.type == "cuda"
        )


def assemble_batch(
    raw: dict, target, vocab: DraftVocab, device: torch.device, teacher_weight: torch.Tensor
) -> PackedBatch:
    """The one place a PackedBatch is built: documents and positions from the sample boundaries,
    the teacher as the target's final hidden state with `teacher_weight` (the draft vocabulary's
    rows of its lm_head: no [T, V_draft] logits tensor), and whether the target's own pick lies in
    the draft vocabulary (rows without a computed argmax, -1, are never supervised)."""
    doc_ids, positions = doc_layout(raw["offsets"].cpu().diff())
    positions = draft_positions(positions, raw.get("positions"))
    final = raw["final_hidden"].to(device, non_blocking=True)
    argmax = raw.get("target_argmax")
    if argmax is None:  # shards captured without it: recompute from the stored final hidden state
        from specfast.kernels import full_vocab_argmax

        argmax = full_vocab_argmax(final.float(), target.lm_head_weight().float())
    argmax = argmax.to(device).long()
    t2d = vocab.t2d.to(device)
    if "teacher_logits" in raw:  # formed by the online source beside the argmax
        teacher = dict(teacher_logits=raw["teacher_logits"].to(device, non_blocking=True))
    else:
        teacher = dict(teacher_hidden=final, teacher_weight=teacher_weight)
    return PackedBatch(
        input_ids=raw["input_ids"].to(device).long(),
        doc_ids=doc_ids.to(device),
        positions=positions.to(device),
        loss_mask=raw["loss_mask"].to(device).bool(),
        aux_hidden=raw["aux_hidden"].to(device, non_blocking=True),
        target_in_vocab=(argmax >= 0) & t2d[argmax.clamp(min=0)],
        **teacher,
    )


class Batches:
    """PackedBatches in the plan's order from a source; resumable through state_dict."""

    def __init__(self, source, plan: BatchPlan, target, vocab: DraftVocab, device: torch.device):
        self.source, self.plan, self.target, self.vocab = source, plan, target, vocab
        self.device = device
        self._stream = None
        # The draft vocabulary's rows of the target's lm_head, gathered once for every batch.
        self.teacher_weight = target.lm_head_weight()[vocab.draft_ids.to(target.device)].to(device)

    def next_raw(self) -> dict:
        if self._stream is None:  # reads ahead from the current position on
            self._stream = iter(self.source.stream(self.plan.upcoming()))
        ids = self.plan.next()
        raw = next(self._stream)
        if not np.array_equal(raw["sample_ids"].cpu().numpy(), ids):
            raise RuntimeError("batch stream out of step with its plan")  # a bug, not bad data
        return raw

    def next(self) -> PackedBatch:
        return assemble_batch(
            self.next_raw(), self.target, self.vocab, self.device, self.teacher_weight
        )

    def state_dict(self) -> dict:
        return self.plan.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.plan.load_state_dict(s)
        self.close()

    def close(self) -> None:
        if self._stream is not None and hasattr(self._stream, "close"):
            self._stream.close()
        self._stream = None


def supervised_within(data: PreparedData, batch_tokens: int) -> np.ndarray:
    """Samples with at least one supervised token in their first `batch_tokens` tokens (the rest
    would only cost a target forward: a long prompt cut to the budget can lose its whole answer)."""
    supervised = np.concatenate([[0], np.cumsum(data.loss_mask.numpy(), dtype=np.int64)])
    starts = data.offsets[:-1].numpy()
    ends = np.minimum(data.offsets[1:].numpy(), starts + batch_tokens)
    keep = np.nonzero(supervised[ends] - supervised[starts] > 0)[0]
    if len(keep) < len(starts):
        log.info(
            "%d of %d samples have no assistant token within %d tokens; skipped",
            len(starts) - len(keep),
            len(starts),
            batch_tokens,
        )
    return keep


def online_plan(
    data: PreparedData,
    batch_tokens: int,
    seed: int,
    shuffle: bool = True,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int = 0,
) -> BatchPlan:
    """The plan over a prepared dataset: only samples that can be supervised within the token
    budget; the first `max_samples` of them when it is > 0."""
    eligible = supervised_within(data, batch_tokens)
    if max_samples > 0:
        eligible = eligible[:max_samples]
    return BatchPlan(
        data.lengths(),
        batch_tokens,
        seed,
        eligible=eligible,
        shuffle=shuffle,
        rank=rank,
        world_size=world_size,
    )


def open_online(
    data: PreparedData,
    target,
    batch_tokens: int,
    seed: int,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    fused_teacher: bool = True,
    cache_bytes: int = 0,
    max_samples: int = 0,
) -> Batches:
    """`fused_teacher`: the teacher logits come out of the argmax's pass over the lm_head (see
    TargetRows), screened in bf16 on CPUs where bf16 matmuls are fast; off where memory is the
    limit (the trainer then forms them per TTT step from the final hidden state). `cache_bytes`:
    keep the target's outputs per sample (TargetOutputCache); `max_samples`: see online_plan."""
    cache = TargetOutputCache(cache_bytes) if cache_bytes > 0 else None
    source = TargetRows(data, target, batch_tokens, cache=cache)
    batches = Batches(
        source,
        online_plan(
            data, batch_tokens, seed, rank=rank, world_size=world_size, max_samples=max_samples
        ),
        target,
        data.vocab,
        device,
    )
    if fused_teacher:
        weight = target.lm_head_weight()
        screen = weight.device.type == "cpu" and cpu_bf16_is_fast()
        source.teacher = SplitVocabArgmax(
            weight,
            data.vocab.draft_ids,
            screen_dtype=torch.bfloat16 if screen else None,
            keep_weight=batches.teacher_weight.to(weight.device),
        )
        log.info(
            "online teacher: draft-vocabulary logits from the argmax's pass over the lm_head%s",
            " (other columns screened in bf16, exact)" if screen else "",
        )
    return batches


def open_offline(
    dataset,
    target,
    batch_tokens: int,
    seed: int,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int = 0,
) -> Batches:
    """`dataset`: a ShardDataset; `target` needs only the tokenizer, embeddings and lm_head.
    `rank` of `world_size` reads only its own batches of the one global plan; `max_samples` > 0:
    the first that many samples only."""
    shard_dir = dataset.path
    cap = dataset.capture
    vocab = read_vocab(Path(shard_dir))
    check_matches_target(
        shard_dir,
        target,
        source=f"captured from {cap['target']}",
        tokenizer_hash=cap["tokenizer_hash"],
        hidden_size=cap["hidden_size"],
        vocab_size=vocab.target_vocab_size,
    )
    n = len(dataset.sample_lengths)
    eligible = np.arange(min(n, max_samples) if max_samples > 0 else n, dtype=np.int64)
    plan = BatchPlan(
        dataset.sample_lengths,
        batch_tokens,
        seed,
        eligible=eligible,
        rank=rank,
        world_size=world_size,
    )
    return Batches(ShardRows(dataset, batch_tokens, device), plan, target, vocab, device)


def is_shard_folder(path) -> bool:
    return (Path(path) / "manifest.json").is_file()
