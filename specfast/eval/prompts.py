"""Prompt sets for `specfast eval`: conversations whose user turns are answered one after another.

Accepted records (JSONL, one per line, or one JSON array of them):
    {"turns": ["hi", "and then?"]}                                  user turns
    {"messages": [{"role": "user", "content": ...}, ...]}           OpenAI style (heldout.jsonl)
    {"conversations": [{"from": "human", "value": ...}, ...]}       ShareGPT style
Chat records are read as `specfast prepare` reads them (specfast.data.readers, its role table
included), then only the user turns and a system message before the first of them are kept: the
answers are the target's own. Unlike training data, a bad record or line is an error, not skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specfast.data.readers import RecordError, iter_records, record_turns


@dataclass
class Prompt:
    turns: list[str]  # user turns, answered in order
    system: str | None = None
    where: str = ""  # file:line, for messages


def parse_record(record, where: str) -> Prompt:
    if isinstance(record, dict) and "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise RecordError(where, "'turns' must be a list of strings")
        turns, system = [t for t in turns if t.strip()], None
    elif isinstance(record, dict) and not ("messages" in record or "conversations" in record):
        raise RecordError(where, "no 'turns', 'messages' or 'conversations' field")
    else:
        turns, system = [], None
        for _, role, text in record_turns(record, where):
            if role == "user":
                turns.append(text)
            elif role == "system" and not turns and system is None:
                system = text
    if not turns:
        raise RecordError(where, "no user turn")
    return Prompt(turns=turns, system=system, where=where)


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be ≥ 1, not {limit}")
    prompts = []
    for where, record in iter_records(path, strict=True):
        prompts.append(parse_record(record, where))
        if len(prompts) == limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
