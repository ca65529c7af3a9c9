"""Prompt sets for `specfast eval`: conversations whose user turns are answered one after another.

Accepted records (JSONL, one per line, or one JSON array of them):
    {"turns": ["hi", "and then?"]}                                  user turns
    {"messages": [{"role": "user", "content": ...}, ...]}           OpenAI style (heldout.jsonl)
    {"conversations": [{"from": "human", "value": ...}, ...]}       ShareGPT style
    {"messages": [{"role": "user", "content": [{"type": "image_url", ...}, {"type": "text", ...}]}]}
        user turns with images or audio (content parts as `specfast prepare` reads them,
        specfast.data.media; relative paths from the prompt file's folder), for a vision or
        speech target: the media are in the target's context while it answers
Chat records are read as `specfast prepare` reads them (specfast.data.readers, its role table
included), then only the user turns and a system message before the first of them are kept: the
answers are the target's own. Unlike training data, a bad record or line is an error, not skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from specfast.data.readers import RecordError, iter_records, record_turns


@dataclass
class Prompt:
    turns: list  # user turns, answered in order: strings, or content-part lists with media
    system: str | None = None
    where: str = ""  # file:line, for messages
    media: list[list] = field(default_factory=list)  # per turn: its Media (specfast.data.media)


def parse_media_record(record, where: str, base_dir: Path) -> Prompt:
    """A record whose user turns hold content parts (images, audio): their parts and media."""
    from specfast.data.media import MediaError, read_part
    from specfast.data.readers import ROLE_ALIASES

    turns, media, system = [], [], None
    for j, turn in enumerate(record["messages"]):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise RecordError(where, f"turn {j} lacks 'role'/'content'")
        role = ROLE_ALIASES.get(str(turn["role"]).lower())
        content = turn["content"]
        if role == "system" and not turns and system is None and isinstance(content, str):
            system = content
        if role != "user":
            continue
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts, items = [], []
        for p, part in enumerate(content if isinstance(content, list) else []):
            try:
                clean, m = read_part(part, base_dir, f"turn {j} part {p}")
            except MediaError as e:
                raise RecordError(where, str(e)) from None
            parts.append(clean)
            if m is not None:
                items.append(m)
        if parts:
            turns.append(parts)
            media.append(items)
    if not turns:
        raise RecordError(where, "no user turn")
    return Prompt(turns=turns, system=system, where=where, media=media)


def parse_record(record, where: str, base_dir: Path | None = None) -> Prompt:
    from specfast.data.media import has_media_parts

    if has_media_parts(record):
        return parse_media_record(record, where, base_dir or Path("."))
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
        prompts.append(parse_record(record, where, Path(path).resolve().parent))
        if len(prompts) == limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
