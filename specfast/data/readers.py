"""Streaming readers for chat data: ShareGPT-style (`conversations` of from/value) and OpenAI-style
(`messages` of role/content), as JSONL or as one JSON array — including an array cut off mid-file,
from which every complete record is recovered."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
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


def normalise(record, where: str) -> list[dict]:
    """One record -> a list of {"role", "content"} with roles user/assistant/system, consecutive turns
    of the same role merged, leading assistant turns dropped. Raises RecordError with the reason."""
    if not isinstance(record, dict):
        raise RecordError(where, f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif "messages" in record:
        turns, role_key, text_key = record["messages"], "role", "content"
    else:
        raise RecordError(where, "no 'conversations' or 'messages' field")
    if not isinstance(turns, list):
        raise RecordError(where, f"'{'conversations' if role_key == 'from' else 'messages'}' is not a list")
    messages: list[dict] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise RecordError(where, f"turn {j} lacks '{role_key}'/'{text_key}'")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        text = turn[text_key]
        if role is None:
            raise RecordError(where, f"turn {j} has unknown role {turn[role_key]!r}")
        if not isinstance(text, str):
            raise RecordError(where, f"turn {j} content is {type(text).__name__}, not a string")
        if not text.strip():
            continue
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


def _iter_json_array(path: Path, text: str, stats: ReadStats) -> Iterator[tuple[str, object]]:
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
                raise RecordError(f"{path}: array index {index}", f"invalid JSON ({e.msg} at char {e.pos})") from None
            # The file stops mid-record: everything from here on is the lost tail.
            stats.truncated_bytes = len(text[i:].encode("utf-8", "replace"))
            return
        yield f"{path}: array index {index}", obj
        index += 1
        i = end


def iter_records(path: str | Path, stats: ReadStats | None = None) -> Iterator[tuple[str, object]]:
    """Yield (where, raw record) from a .json array (possibly cut off) or JSONL file. Lines of JSONL
    that do not parse are counted in `stats` and skipped."""
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    stats.total_bytes = path.stat().st_size
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            yield from _iter_json_array(path, f.read(), stats)
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                stats.note_bad(RecordError(f"{path}:{lineno}", f"invalid JSON ({e.msg} at column {e.colno})"))


def iter_conversations(path: str | Path, stats: ReadStats | None = None) -> Iterator[tuple[str, list[dict]]]:
    """Yield (where, messages) for every usable record; bad ones are counted in `stats` and skipped."""
    stats = stats if stats is not None else ReadStats()
    for where, record in iter_records(path, stats):
        stats.records += 1
        try:
            yield where, normalise(record, where)
        except RecordError as err:
            stats.note_bad(err)
