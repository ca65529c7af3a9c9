"""Prompt sets for `specfast eval`: conversations whose user turns are answered one after another.

Accepted records (JSONL, one per line, or one JSON array of them):
    {"turns": ["hi", "and then?"]}                                   user turns
    {"messages": [{"role": "user", "content": ...}, ...]}            OpenAI style (prepare's heldout.jsonl)
    {"conversations": [{"from": "human", "value": ...}, ...]}        ShareGPT style
Only user turns (and a leading system message) are kept: the answers are the target's own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

USER_ROLES = {"user", "human"}
SYSTEM_ROLES = {"system"}


@dataclass
class Prompt:
    turns: list[str]  # user turns, answered in order
    system: str | None = None
    where: str = ""  # file:line, for messages


def parse_record(record, where: str) -> Prompt:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{where}: 'turns' must be a list of strings")
        turns = [t for t in turns if t.strip()]
        system = None
    elif "messages" in record or "conversations" in record:
        key, role_key, text_key = (("messages", "role", "content") if "messages" in record
                                   else ("conversations", "from", "value"))
        msgs = record[key]
        if not isinstance(msgs, list):
            raise ValueError(f"{where}: '{key}' is not a list")
        turns, system = [], None
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
                raise ValueError(f"{where}: {key}[{j}] needs string '{role_key}' and '{text_key}'")
            role = m[role_key].lower()
            if role in USER_ROLES and m[text_key].strip():
                turns.append(m[text_key])
            elif role in SYSTEM_ROLES and not turns and system is None:
                system = m[text_key]
    else:
        raise ValueError(f"{where}: no 'turns', 'messages' or 'conversations' field")
    if not turns:
        raise ValueError(f"{where}: no user turn")
    return Prompt(turns=turns, system=system, where=where)


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        items = [(f"{path}: array index {i}", r) for i, r in enumerate(records)]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be ≥ 1, not {limit}")
        items = items[:limit]
    prompts = [parse_record(r, where) for where, r in items]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
