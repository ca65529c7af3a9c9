"""`prepare --regenerate`: replace each assistant turn by the target's own answer to the same
context, so the draft learns the distribution it will be asked to predict. System and user turns
are kept; each answer is generated with the earlier regenerated answers in its context.

Two ways to generate:
    a TargetModel (HF, in process)   batched over conversations, turn by turn; for small targets.
    ServerGenerator (--regenerate-url)  an OpenAI-compatible server (`vllm serve`): many
                                     conversations in flight at once, retries with backoff on
                                     5xx / 429 / timeouts / dropped connections.

Either way finished conversations are appended to a JSONL file ({"source", "messages"}, one per
line, flushed and fsync'd), so a killed run resumes where it stopped; a torn last line is cut off
and redone. With a token budget (prepare's --max-len under --overlong truncate) nothing is
generated that the cut would throw away: a turn's answer is capped at the room left, and a
conversation stops once it fills the budget (such a record carries "cut_at": the budget, and is
redone by a later run with a larger one). Most ShareGPT conversations then end after their first
answer, so regeneration costs a fraction of the full conversations' turns.

Before generating, the server is checked: reachable, serving the model asked for, and rendering
+ tokenising a probe conversation exactly as `prepare` does (vLLM's /tokenize), so the answers
come from the same model under the same chat template.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import torch
from tqdm import tqdm

from specfast.fileio import atomic_write

from .chat import encode_prompt

log = logging.getLogger("specfast")

RETRY_STATUS = (408, 429, 500, 502, 503, 504)
PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three prime numbers, then say why 1 is not one."},
    {"role": "assistant", "content": "2, 3 and 5. One has a single divisor."},
    {"role": "user", "content": "And 0?"},
]


class ServerError(RuntimeError):
    """The server failed a request for good (after retries, or a reply that cannot be used)."""


class ServerGenerator:
    """Answers through an OpenAI-compatible chat-completions server. `tokenizer` (the target's)
    and `chat_template` are what `prepare` renders with; `check()` holds the server to them."""

    def __init__(
        self,
        url: str,
        tokenizer,
        model: str | None = None,
        chat_template: str | None = None,
        timeout: float = 600.0,
        retries: int = 6,
        backoff: float = 1.0,
    ):
        base = url.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"--regenerate-url {url!r}: expected http://HOST:PORT")
        self.base, self.tokenizer, self.model = base, tokenizer, model
        self.chat_template, self.timeout = chat_template, timeout
        self.retries, self.backoff = retries, backoff

    # -- HTTP ---------------------------------------------------------------------------------

    def _once(self, method: str, path: str, body: dict | None) -> tuple[int, dict | str]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                text = json.loads(text)
            except ValueError:
                pass
            return e.code, text

    def request(self, method: str, path: str, body: dict | None = None, retry: bool = True):
        """(status, reply). Retries with exponential backoff (and jitter) on the statuses in
        RETRY_STATUS and on timeouts / refused or dropped connections; other statuses return."""
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            try:
                status, reply = self._once(method, path, body)
                if status not in RETRY_STATUS:
                    return status, reply
                why = f"HTTP {status}: {_message(reply)}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                why = str(getattr(e, "reason", e))
            except (HTTPException, json.JSONDecodeError) as e:
                why = f"bad reply ({type(e).__name__}: {e})"
            if attempt + 1 < attempts:
                delay = self.backoff * 2**attempt * (1 + random.random() / 4)
                log.warning(
                    "%s%s: %s; retrying in %.1f s (%d/%d)",
                    self.base,
                    path,
                    why,
                    delay,
                    attempt + 1,
                    self.retries,
                )
                time.sleep(delay)
        raise ServerError(f"{self.base}{path}: {why} (gave up after {attempts} attempt(s))")

    # -- checks -------------------------------------------------------------------------------

    def check(self) -> str:
        """Reachable, serving the model, rendering and tokenising as `prepare` does. Returns what
        was checked: "tokens" (the probe's token ids compared) or "name" (no /tokenize)."""
        try:
            status, reply = self.request("GET", "/v1/models", retry=False)
        except ServerError as e:
            raise ValueError(
                f"cannot reach the regeneration server at {self.base} ({e}); start one, e.g. "
                "`vllm serve MODEL --dtype float32`, and pass its address to --regenerate-url"
            ) from None
        if status != 200 or not isinstance(reply, dict) or "data" not in reply:
            raise ValueError(
                f"{self.base}/v1/models answered {status} ({_message(reply)}): not an "
                "OpenAI-compatible server"
            )
        served = [m.get("id") for m in reply["data"]]
        if self.model is None:
            if len(served) != 1:
                raise ValueError(
                    f"{self.base} serves {served}; name the one to use with --regenerate-model"
                )
            self.model = served[0]
        elif self.model not in served:
            raise ValueError(
                f"{self.base} serves {served}, not {self.model!r} (--regenerate-model)"
            )
        body = {"model": self.model, "messages": PROBE, "add_generation_prompt": True}
        if self.chat_template is not None:
            body["chat_template"] = self.chat_template
        status, reply = self.request("POST", "/tokenize", body)
        if status == 404:
            log.warning(
                "%s has no /tokenize endpoint: cannot check that %s tokenises and templates "
                "as the target does",
                self.base,
                self.model,
            )
            return "name"
        if status != 200 or not isinstance(reply, dict) or "tokens" not in reply:
            raise ValueError(f"{self.base}/tokenize answered {status}: {_message(reply)}")
        ours = encode_prompt(self.tokenizer, PROBE, "probe conversation", self.chat_template)
        theirs = list(reply["tokens"])
        if theirs != ours:
            i = next((j for j, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
            i = min(len(theirs), len(ours)) if i is None else i
            raise ValueError(
                f"{self.base} serves {self.model!r}, which renders and tokenises a probe "
                f"conversation differently from the target's tokenizer and chat template "
                f"({len(theirs)} vs {len(ours)} tokens, first difference at token {i}): "
                "another model, or another chat template"
            )
        return "tokens"

    # -- generation ---------------------------------------------------------------------------

    def answer(self, messages: list[dict], temperature: float, max_new_tokens: int, seed: int):
        """The assistant's answer to `messages`, or raises ServerError / ContextError."""
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
        }
        if temperature > 0:
            body["seed"] = seed
        if self.chat_template is not None:
            body["chat_template"] = self.chat_template
        status, reply = self.request("POST", "/v1/chat/completions", body)
        if status == 400:  # e.g. the context is longer than the server's max_model_len
            raise RejectedError(_message(reply))
        if status != 200:
            raise ServerError(
                f"{self.base}/v1/chat/completions answered {status}: {_message(reply)}"
            )
        try:
            return (reply["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            raise ServerError(
                f"{self.base}/v1/chat/completions: no choices[0].message.content in {reply!r:.200}"
            ) from None


class RejectedError(Exception):
    """The server refused one conversation (HTTP 400): that conversation stops there."""


def _message(reply) -> str:
    if isinstance(reply, dict):
        err = reply.get("error", reply.get("message", reply))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    return str(reply)[:300]


# -- the append-only log ------------------------------------------------------------------------


def _resume(path: Path, token_budget: int | None) -> dict[str, list[dict]]:
    """The conversations an earlier run finished, less those it cut at a smaller token budget than
    `token_budget` (None: no budget). A torn last line (a killed run) is cut off the file, so that
    the lines appended next start on a line of their own."""
    done: dict[str, list[dict]] = {}
    text = path.read_text()
    kept = 0
    for line in text.splitlines(keepends=True):
        try:
            rec = json.loads(line)
            cut = rec.get("cut_at")
            if cut is None or (token_budget is not None and cut >= token_budget):
                done[rec["source"]] = rec["messages"]
            else:  # a later record of the same conversation (this run's redo) replaces it
                done.pop(rec["source"], None)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            break
        if not line.endswith("\n"):
            break
        kept += len(line)
    if kept < len(text):
        log.warning("%s: cut off a torn last line (%d bytes); it is redone", path, len(text) - kept)
        atomic_write(path, text[:kept])
    return done


def _append(f, record: dict) -> None:
    # An append-only log, not a replaced file: each finished conversation is made durable.
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _split(msgs: list[dict]) -> tuple[list[dict], list[dict]]:
    return [m for m in msgs if m["role"] == "system"], [m for m in msgs if m["role"] == "user"]


def regenerate(
    target,
    convs: list[tuple[str, list[dict]]],
    path: Path,
    temperature: float = 0.0,
    batch_size: int = 32,
    max_new_tokens: int = 512,
    seed: int = 0,
    concurrency: int = 16,
    chat_template: str | None = None,
    progress: bool = True,
    token_budget: int | None = None,
) -> list[tuple[str, list[dict]]]:
    """The conversations with their assistant turns regenerated by `target` (a TargetModel, or a
    ServerGenerator), resuming from `path`. `batch_size`: conversations per HF generate call;
    `concurrency`: conversations in flight on a server; `token_budget`: the tokens of each
    conversation that will be kept (None: all), beyond which nothing is generated."""
    path = Path(path)
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token budget must be ≥ 1, not {token_budget}")
    done = _resume(path, token_budget) if path.exists() else {}
    if done:
        log.info("regenerate: resuming, %d of %d conversations already done", len(done), len(convs))
    todo = [(w, m) for w, m in convs if w not in done]
    run = _Run(path, temperature, max_new_tokens, seed, progress, token_budget)
    if isinstance(target, ServerGenerator):
        if concurrency < 1:
            raise ValueError(f"--concurrency must be ≥ 1, not {concurrency}")
        if target.chat_template is None:
            target.chat_template = chat_template
        target.check()
        _with_server(target, todo, done, run, concurrency)
    else:
        if batch_size < 1:
            raise ValueError(f"--regen-batch must be ≥ 1, not {batch_size}")
        _with_model(target, todo, done, run, batch_size, chat_template)
    return [(w, done[w]) for w, _ in convs]


@dataclass(frozen=True)
class _Run:
    """What both ways of generating share."""

    path: Path
    temperature: float
    max_new_tokens: int
    seed: int
    progress: bool
    budget: int | None


def _room(prompt_len: int, max_new_tokens: int, budget: int | None) -> int:
    """New tokens worth generating after a `prompt_len`-token prompt: ≤ 0 when the budget is
    already full (the answer would be cut away whole)."""
    return max_new_tokens if budget is None else min(max_new_tokens, budget - prompt_len)


def _with_model(target, todo, done, run: _Run, batch_size: int, template):
    tok = target.tokenizer
    torch.manual_seed(run.seed)

    # Batch conversations of similar length: a batch is padded to its longest prompt, so one
    # 3k-token prompt among short ones multiplies the whole batch's prefill (measured: 32 ShareGPT
    # first turns unsorted did not finish in 15 minutes; sorted, 64 took 63 s). Under a budget
    # most conversations end after their first answer: sort by what comes before it.
    def size(msgs):
        if run.budget is not None:
            msgs = msgs[: next((i + 1 for i, m in enumerate(msgs) if m["role"] == "user"), None)]
        return sum(len(m["content"]) for m in msgs)

    todo = sorted(todo, key=lambda wm: size(wm[1]))
    with open(run.path, "a") as f:
        for start in tqdm(
            range(0, len(todo), batch_size),
            desc="regenerate",
            unit="batch",
            disable=not run.progress,
        ):
            batch = todo[start : start + batch_size]
            new, users = zip(*(_split(msgs) for _, msgs in batch))
            new = [list(n) for n in new]
            cut = [False] * len(batch)  # stopped by the budget
            for turn in range(max(len(u) for u in users)):
                active, prompts, rooms = [], [], []
                for i in range(len(batch)):
                    if cut[i] or turn >= len(users[i]):
                        continue
                    prompt = encode_prompt(tok, new[i] + [users[i][turn]], batch[i][0], template)
                    room = _room(len(prompt), run.max_new_tokens, run.budget)
                    if room <= 0:  # this user turn and all after it would be cut away
                        cut[i] = True
                        continue
                    new[i].append(users[i][turn])
                    active.append(i)
                    prompts.append(prompt)
                    rooms.append(room)
                if not active:
                    break
                # One call per turn: as many new tokens as the roomiest prompt can keep.
                answers = target.generate(prompts, max(rooms), run.temperature)
                for i, prompt, room, ids in zip(active, prompts, rooms, answers):
                    ids = list(ids)[:room]
                    text = tok.decode(ids, skip_special_tokens=True).strip()
                    new[i].append({"role": "assistant", "content": text})
                    # The budget is full: the answer may be cut short, later turns are cut away.
                    cut[i] = run.budget is not None and len(prompt) + len(ids) >= run.budget
            for (where, _), msgs, was_cut in zip(batch, new, cut):
                done[where] = msgs
                record = {"source": where, "messages": msgs}
                if was_cut:
                    record["cut_at"] = run.budget
                _append(f, record)


def _with_server(server, todo, done, run: _Run, concurrency: int):
    stop = threading.Event()
    rejected = [0]

    def one(where: str, msgs: list[dict]) -> tuple[str, dict]:
        new, users = _split(msgs)
        for turn, user in enumerate(users):
            if stop.is_set():
                raise ServerError("stopped")
            room = run.max_new_tokens
            if run.budget is not None:
                prompt = encode_prompt(server.tokenizer, new + [user], where, server.chat_template)
                room = _room(len(prompt), run.max_new_tokens, run.budget)
                if room <= 0:  # this user turn and all after it would be cut away
                    return where, {"source": where, "messages": new, "cut_at": run.budget}
            new.append(user)
            try:
                # A seed per conversation and turn, the same however the run was resumed.
                turn_seed = (run.seed + zlib.crc32(f"{where}#{turn}".encode())) % 2**31
                ans = server.answer(new, run.temperature, room, turn_seed)
            except RejectedError as e:  # keep the turns answered so far; no assistant turn: skipped
                new.pop()
                return where, {"source": where, "messages": new, "rejected": str(e)}
            new.append({"role": "assistant", "content": ans})
            if run.budget is not None:  # full: the answer may be cut short, later turns cut away
                answer_ids = server.tokenizer(ans, add_special_tokens=False)["input_ids"]
                if len(prompt) + len(answer_ids) >= run.budget:
                    return where, {"source": where, "messages": new, "cut_at": run.budget}
        return where, {"source": where, "messages": new}

    bar = tqdm(total=len(todo), desc="regenerate", unit="conv", disable=not run.progress)
    with open(run.path, "a") as f, ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(one, w, m) for w, m in todo]
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                failed = [fut for fut in finished if fut.exception() is not None]
                for fut in finished:
                    if fut.exception() is not None:
                        continue
                    where, record = fut.result()
                    _append(f, record)  # only this thread writes
                    done[where] = record["messages"]
                    if "rejected" in record:
                        rejected[0] += 1
                        if rejected[0] <= 5:
                            log.warning(
                                "%s: the server refused a turn (%s)", where, record["rejected"]
                            )
                    bar.update(1)
                if failed:  # the finished conversations are kept; the rest is redone on resume
                    raise failed[0].exception()
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise
        finally:
            bar.close()
    if rejected[0]:
        log.warning(
            "the server refused %d conversation(s) part-way; kept their answered turns", rejected[0]
        )
