"""`prepare --regenerate`: replace each assistant turn by the target's own answer to the same context,
so the draft learns the distribution it will be asked to predict. Batched over conversations, turn by
turn; finished conversations are appended to a JSONL file, so a killed run resumes where it stopped."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger("specfast")


def _generate(target, prompts: list[list[dict]], temperature: float, max_new_tokens: int) -> list[str]:
    tok, model = target.tokenizer, target.model
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(target.device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def regenerate(target, convs: list[tuple[str, list[dict]]], path: Path, temperature: float = 0.0,
               batch_size: int = 8, max_new_tokens: int = 512, seed: int = 0) -> list[tuple[str, list[dict]]]:
    done: dict[str, list[dict]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["source"]] = rec["messages"]
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line from a killed run: everything after it is redone
        log.info("regenerate: resuming, %d of %d conversations already done", len(done), len(convs))
    todo = [(w, m) for w, m in convs if w not in done]
    torch.manual_seed(seed)
    with open(path, "a") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc="regenerate", unit="batch"):
            batch = todo[start: start + batch_size]
            # Keep system and user turns; the answers become the target's own, one turn at a time.
            new = [[m for m in msgs if m["role"] == "system"] for _, msgs in batch]
            users = [[m for m in msgs if m["role"] == "user"] for _, msgs in batch]
            for turn in range(max(len(u) for u in users)):
                active = [i for i, u in enumerate(users) if turn < len(u)]
                for i in active:
                    new[i].append(users[i][turn])
                answers = _generate(target, [new[i] for i in active], temperature, max_new_tokens)
                for i, ans in zip(active, answers):
                    new[i].append({"role": "assistant", "content": ans})
            for (where, _), msgs in zip(batch, new):
                done[where] = msgs
                f.write(json.dumps({"source": where, "messages": msgs}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return [(w, done[w]) for w, _ in convs]
