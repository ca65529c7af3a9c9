"""`prepare --regenerate`: replace each assistant turn by the target's own answer to the same
context, so the draft learns the distribution it will be asked to predict. Batched over
conversations, turn by turn; finished conversations are appended to a JSONL file, so a killed run
resumes where it stopped."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from specfast.fileio import atomic_write

from .chat import encode_prompt

log = logging.getLogger("specfast")


def _answers(
    target, wheres: list[str], contexts: list[list[dict]], temperature: float, max_new_tokens: int
) -> list[str]:
    tok = target.tokenizer
    prompts = [encode_prompt(tok, m, w) for w, m in zip(wheres, contexts)]
    answers = target.generate(prompts, max_new_tokens, temperature)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in answers]


def _resume(path: Path) -> dict[str, list[dict]]:
    """The conversations an earlier run finished. A torn last line (a killed run) is cut off the
    file, so that the lines appended next start on a line of their own."""
    done: dict[str, list[dict]] = {}
    text = path.read_text()
    kept = 0
    for line in text.splitlines(keepends=True):
        try:
            rec = json.loads(line)
            done[rec["source"]] = rec["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break
        if not line.endswith("\n"):
            break
        kept += len(line)
    if kept < len(text):
        atomic_write(path, text[:kept])
    return done


def regenerate(
    target,
    convs: list[tuple[str, list[dict]]],
    path: Path,
    temperature: float = 0.0,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    seed: int = 0,
) -> list[tuple[str, list[dict]]]:
    done = _resume(path) if path.exists() else {}
    if path.exists():
        log.info("regenerate: resuming, %d of %d conversations already done", len(done), len(convs))
    todo = [(w, m) for w, m in convs if w not in done]
    torch.manual_seed(seed)
    with open(path, "a") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc="regenerate", unit="batch"):
            batch = todo[start : start + batch_size]
            # Keep system and user turns; the answers become the target's own, one turn at a time.
            new = [[m for m in msgs if m["role"] == "system"] for _, msgs in batch]
            users = [[m for m in msgs if m["role"] == "user"] for _, msgs in batch]
            for turn in range(max(len(u) for u in users)):
                active = [i for i, u in enumerate(users) if turn < len(u)]
                for i in active:
                    new[i].append(users[i][turn])
                answers = _answers(
                    target,
                    [batch[i][0] for i in active],
                    [new[i] for i in active],
                    temperature,
                    max_new_tokens,
                )
                for i, ans in zip(active, answers):
                    new[i].append({"role": "assistant", "content": ans})
            for (where, _), msgs in zip(batch, new):
                done[where] = msgs
                f.write(json.dumps({"source": where, "messages": msgs}) + "\n")
            # An append-only log, not a replaced file: each finished batch is made durable.
            f.flush()
            os.fsync(f.fileno())
    return [(w, done[w]) for w, _ in convs]
