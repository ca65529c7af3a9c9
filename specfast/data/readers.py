"""The chat-record reader, for training data (`specfast prepare`) and prompts (`specfast eval`):
ShareGPT-style (`conversations` of from/value) and OpenAI-style (`messages` of role/content)
records, as JSONL or as one JSON array — including an array cut off mid-file, from which every
complete record is recovered.

`record_turns` parses one record into its turns with canonical roles; `normalise` makes a
training conversation of them, and eval picks the user turns (specfast/eval/prompts.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A record that cannot be used; `where` names the file and line or array index."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclass
class ReadStats:
    records: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)  # the first few bad-record messages
    truncated_bytes: int = 0  # bytes after the last complete record of a cut-off JSON array
    total_bytes: int = 0

    def note_bad(self, err: RecordError, keep: int = 10) -> None:
        self.bad += 1
        if len(self.examples) < keep:
            self.examples.append(str(err))


def record_turns(record, where: str) -> list[tuple[int, str, str]]:
    """One record -> its non-empty turns in order, as (index in the record, role, text) with the
    role one of user/assistant/system. Raises RecordError with the reason."""
    if not isinstance(record, dict):
        raise RecordError(where, f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        key, role_key, text_key = "conversations", "from", "value"
    elif "messages" in record:
        key, role_key, text_key = "messages", "role", "content"
    else:
        raise RecordError(where, "no 'conversations' or 'messages' field")
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordError(where, f"'{key}' is not a list")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise RecordError(where, f"turn {j} lacks '{role_key}'/'{text_key}'")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        text = turn[text_key]
        if role is None:
            raise RecordError(where, f"turn {j} has unknown role {turn[role_key]!r}")
        if not isinstance(text, str):
            raise RecordError(where, f"turn {j} content is {type(text).__name__}, not a string")
        if text.strip():
            out.append((j, role, text))
    return out


def normalise(record, where: str) -> list[dict]:
    """One record -> a training conversation of {"role", "content"}: its turns (record_turns),
    consecutive turns of the same role merged, leading assistant turns dropped, at least one
    answer. Raises RecordError with the reason."""
    messages: list[dict] = []
    for j, role, text in record_turns(record, where):
        if role == "system" and messages:
            raise RecordError(where, f"turn {j}: system message after the conversation started")
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append({"role": role, "content": text})
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(where, "no assistant turn after a user turn")
    return messages


def _iter_json_array(
    path: Path, text: str, stats: ReadStats, strict: bool
) -> Iterator[tuple[str, object]]:
    decoder = json.JSONDecoder()
    n = len(text)
    i = text.index("[") + 1
    cut_off = not text.rstrip().endswith("]")  # a complete array ends with ']'
    index = 0
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if not cut_off:
                raise RecordError(
                    f"{path}: array index {index}", f"invalid JSON ({e.msg} at char {e.pos})"
                ) from None
            # The file stops mid-record: everything from here on is the lost tail.
            stats.truncated_bytes = len(text[i:].encode("utf-8", "replace"))
            if strict:
                raise RecordError(
                    f"{path}: array index {index}", "the file is cut off inside this record"
                ) from None
            return
        yield f"{path}: array index {index}", obj
        index += 1
        i = end


def iter_records(
    path: str | Path, stats: ReadStats | None = None, strict: bool = False
) -> Iterator[tuple[str, object]]:
    """Yield (where, raw record) from a .json array (possibly cut off) or JSONL file. Lines of JSONL
    that do not parse are counted in `stats` and skipped; `strict`, they and a cut-off array raise
    RecordError instead."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    stats.total_bytes = path.stat().st_size
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            yield from _iter_json_array(path, f.read(), stats, strict)
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                err = RecordError(f"{path}:{lineno}", f"invalid JSON ({e.msg} at column {e.colno})")
                if strict:
                    raise err from None
                stats.note_bad(err)


def iter_conversations(
    path: str | Path, stats: ReadStats | None = None
) -> Iterator[tuple[str, list[dict]]]:
    """Yield (where, messages) for every usable record; bad ones are counted in `stats` and
    skipped."""
    stats = stats if stats is not None else ReadStats()
    for where, record in iter_records(path, stats):
        stats.records += 1
        try:
            yield where, normalise(record, where)
        except RecordError as err:
            stats.note_bad(err)
