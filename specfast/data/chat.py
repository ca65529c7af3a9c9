"""Applying a tokenizer's own chat template: a whole conversation with its assistant tokens marked
(the loss mask), and a prompt awaiting the answer (eval, `prepare --regenerate`).

The mask works for any template that renders a conversation as a growing prefix: for each assistant
turn i we render messages[:i] with the generation prompt (P_i) and messages[:i+1] (Q_i); both must
be prefixes of the whole rendering, and the characters in [len(P_i), len(Q_i)) — minus trailing
whitespace the template adds after the end-of-turn token — are that turn's answer. Tokens are
marked through the fast tokenizer's character offsets, so the mask is right whatever the template's
special tokens are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class TemplateError(ValueError):
    pass


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]: True where the token is part of an assistant answer


def _render(tokenizer, messages, add_generation_prompt: bool, template: str | None) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
    )


def encode_prompt(
    tokenizer, messages: list[dict], where: str, template: str | None = None
) -> list[int]:
    """Token ids of `messages` rendered with the generation prompt (no extra special tokens)."""
    try:
        text = _render(tokenizer, messages, True, template)
    except Exception as e:  # a template error is a data/tokenizer problem: say where
        raise ValueError(f"{where}: chat template failed ({e})") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{where}: the chat template produced no tokens")
    return list(ids)


def assistant_spans(
    tokenizer, messages: list[dict], template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of each assistant answer (end-of-turn token
    included)."""
    full = _render(tokenizer, messages, False, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, template)
        upto = _render(tokenizer, messages[: i + 1], False, template)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise TemplateError(
                f"chat template does not render turn {i} as a prefix of the "
                "conversation; the assistant mask cannot be derived from it"
            )
        end = len(prompt) + len(upto[len(prompt) :].rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return full, spans


def tokenize_conversation(
    tokenizer, messages: list[dict], template: str | None = None
) -> Tokenized:
    """Token ids of the templated conversation and the assistant-token mask."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("a fast tokenizer (with character offsets) is required")
    text, spans = assistant_spans(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    starts = offsets[:, 0]
    for a, b in spans:
        # A token belongs to the answer if it begins inside it: a token the assistant generates.
        mask |= (starts >= a) & (starts < b)
    return Tokenized(ids, mask)
