"""`prepare --regenerate` (specfast/data/regenerate.py): through a tiny in-process server that
speaks the chat-completions API (concurrency, retries, resume after a kill, bad or wrong servers),
and in process through an HF target."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from specfast.data.chat import encode_prompt
from specfast.data.regenerate import ServerError, ServerGenerator, regenerate


class FakeServer:
    """Chat completions answered instantly (or after `delay`), the answer naming the context it saw:
    "a<number of assistant turns so far> <last user turn reversed>"."""

    def __init__(
        self,
        tokenizer,
        model="tiny",
        *,
        delay=0.0,
        fail_first=0,
        fail_status=503,
        wrong_tokens=False,
        tokenize=True,
        too_long_word=None,
    ):
        self.tokenizer, self.model, self.delay = tokenizer, model, delay
        self.fail_left, self.fail_status = fail_first, fail_status
        self.wrong_tokens, self.tokenize, self.too_long_word = wrong_tokens, tokenize, too_long_word
        self.lock = threading.Lock()
        self.completions = self.inflight = self.max_inflight = 0
        self.bodies = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self.reply(200, {"object": "list", "data": [{"id": server.model}]})
                self.reply(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize" and server.tokenize:
                    ids = encode_prompt(
                        server.tokenizer, body["messages"], "srv", body.get("chat_template")
                    )
                    if server.wrong_tokens:
                        ids = ids[:5] + [ids[5] + 1] + ids[6:]
                    return self.reply(200, {"tokens": ids, "count": len(ids)})
                if self.path != "/v1/chat/completions":
                    return self.reply(404, {"error": {"message": "not found"}})
                with server.lock:
                    server.bodies.append(body)
                    if server.fail_left > 0:
                        server.fail_left -= 1
                        return self.reply(server.fail_status, {"error": {"message": "busy"}})
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:  # the answer is formed in flight; it leaves after the count drops, so
                    # that a client's next request can never overlap this one in the count
                    status, obj = self.answer(body)
                finally:
                    with server.lock:
                        server.inflight -= 1
                self.reply(status, obj)

            def answer(self, body):
                time.sleep(server.delay)
                msgs = body["messages"]
                if body["model"] != server.model:
                    return 404, {"error": {"message": "no such model"}}
                last = msgs[-1]["content"]
                if server.too_long_word and server.too_long_word in last:
                    return 400, {"error": {"message": "context too long"}}
                n = sum(m["role"] == "assistant" for m in msgs)
                text = f"a{n} " + " ".join(reversed(last.split()))
                with server.lock:
                    server.completions += 1
                choice = {"index": 0, "message": {"role": "assistant", "content": text}}
                return 200, {"choices": [{**choice, "finish_reason": "stop"}]}

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tok(tiny_target_dir):
    return AutoTokenizer.from_pretrained(tiny_target_dir)


def _convs(n=12):
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            msgs += [
                {"role": "user", "content": f"question {i} part {t} here"},
                {"role": "assistant", "content": "an answer from elsewhere"},
            ]
        out.append((f"conv{i}", msgs))
    return out


def _expected(msgs):
    new = [m for m in msgs if m["role"] == "system"]
    for n, u in enumerate(m for m in msgs if m["role"] == "user"):
        new += [
            u,
            {"role": "assistant", "content": f"a{n} " + " ".join(reversed(u["content"].split()))},
        ]
    return new


def _first_prompt(msgs):
    """The messages up to and with the first user turn."""
    return msgs[: next(i for i, m in enumerate(msgs) if m["role"] == "user") + 1]


def _lines(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def test_server_concurrency_context_and_log(tok, tmp_path):
    convs = _convs()
    with FakeServer(tok, delay=0.2) as srv:
        gen = ServerGenerator(srv.url + "/v1/", tok)  # the /v1 suffix is accepted
        out = regenerate(
            gen, convs, tmp_path / "r.jsonl", concurrency=4, max_new_tokens=7, progress=False
        )
    assert [w for w, _ in out] == [w for w, _ in convs]
    for (_, got), (_, msgs) in zip(out, convs):
        assert got == _expected(msgs)  # later turns see the regenerated earlier answers
    assert 2 <= srv.max_inflight <= 4
    assert srv.completions == sum(1 + i % 3 for i in range(12))
    assert all(
        b["max_tokens"] == 7 and b["temperature"] == 0.0 and b["model"] == "tiny"
        for b in srv.bodies
    )
    lines = _lines(tmp_path / "r.jsonl")
    assert sorted(r["source"] for r in lines) == sorted(w for w, _ in convs)


def test_retries_on_5xx_then_succeeds(tok, tmp_path):
    with FakeServer(tok, fail_first=3) as srv:
        gen = ServerGenerator(srv.url, tok, backoff=0.01)
        out = regenerate(gen, _convs(2), tmp_path / "r.jsonl", concurrency=1, progress=False)
    assert out[0][1] == _expected(_convs(2)[0][1])
    assert len(srv.bodies) == srv.completions + 3


def test_gives_up_after_retries_and_keeps_what_finished(tok, tmp_path):
    with FakeServer(tok, fail_first=10**6, fail_status=500) as srv:
        gen = ServerGenerator(srv.url, tok, retries=2, backoff=0.01)
        with pytest.raises(ServerError, match="HTTP 500.*3 attempt"):
            regenerate(gen, _convs(3), tmp_path / "r.jsonl", concurrency=2, progress=False)
    assert (tmp_path / "r.jsonl").read_text() == ""


def test_timeouts_are_retried(tok, tmp_path):
    with FakeServer(tok, delay=0.5) as srv:
        gen = ServerGenerator(srv.url, tok, timeout=0.2, retries=1, backoff=0.01)
        with pytest.raises(ServerError, match="timed out"):
            regenerate(gen, _convs(1), tmp_path / "r.jsonl", concurrency=1, progress=False)
        assert len(srv.bodies) == 2


def test_a_refused_conversation_keeps_its_answered_turns(tok, tmp_path):
    convs = [
        (
            "c",
            [
                {"role": "user", "content": "fine"},
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": "LONG one"},
                {"role": "assistant", "content": "y"},
            ],
        )
    ]
    with FakeServer(tok, too_long_word="LONG") as srv:
        out = regenerate(ServerGenerator(srv.url, tok), convs, tmp_path / "r.jsonl", progress=False)
    assert out[0][1] == [
        {"role": "user", "content": "fine"},
        {"role": "assistant", "content": "a0 fine"},
    ]
    assert "context too long" in _lines(tmp_path / "r.jsonl")[0]["rejected"]


def test_bad_servers_give_clear_errors(tok, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ValueError, match="cannot reach the regeneration server"):
        ServerGenerator(f"http://127.0.0.1:{port}", tok).check()
    with pytest.raises(ValueError, match="expected http"):
        ServerGenerator("localhost:8000", tok)
    with FakeServer(tok, model="other-model") as srv:
        with pytest.raises(ValueError, match="serves \\['other-model'\\], not 'smollm2'"):
            ServerGenerator(srv.url, tok, model="smollm2").check()
    with FakeServer(tok, wrong_tokens=True) as srv:
        with pytest.raises(ValueError, match="tokenises a probe conversation differently"):
            regenerate(ServerGenerator(srv.url, tok), _convs(1), tmp_path / "r.jsonl")
        assert srv.completions == 0
    with FakeServer(tok, tokenize=False) as srv:  # no /tokenize: checked by name only, warned
        assert ServerGenerator(srv.url, tok).check() == "name"
    with FakeServer(tok) as srv:
        assert ServerGenerator(srv.url, tok).check() == "tokens"
    # A chat template of our own reaches the server (and its check) too.
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with FakeServer(tok) as srv:
        regenerate(
            ServerGenerator(srv.url, tok),
            _convs(1),
            tmp_path / "t.jsonl",
            chat_template=template,
            progress=False,
        )
        assert srv.bodies[0]["chat_template"] == template


_CHILD = """
import json, sys
from transformers import AutoTokenizer
from specfast.data.regenerate import ServerGenerator, regenerate
tok = AutoTokenizer.from_pretrained(sys.argv[1])
convs = [tuple(c) for c in json.load(open(sys.argv[3]))]
regenerate(ServerGenerator(sys.argv[2], tok), convs, sys.argv[4], concurrency=2, progress=False)
"""


def test_resume_after_kill_redoes_only_what_is_missing(tok, tiny_target_dir, tmp_path):
    convs = _convs(16)
    (tmp_path / "convs.json").write_text(json.dumps(convs))
    out = tmp_path / "r.jsonl"
    with FakeServer(tok, delay=0.15) as srv:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(tiny_target_dir),
                srv.url,
                str(tmp_path / "convs.json"),
                str(out),
            ],
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = _lines(out)
    assert 3 <= len(before) < 16, "the kill should land mid-run"
    with open(out, "a") as f:  # and a torn line, as a kill mid-write leaves
        f.write('{"source": "conv15", "messa')
    left = [c for c in convs if c[0] not in {r["source"] for r in before}]
    with FakeServer(tok) as srv:
        got = regenerate(ServerGenerator(srv.url, tok), convs, out, concurrency=3, progress=False)
    assert srv.completions == sum(sum(m["role"] == "user" for m in msgs) for _, msgs in left)
    assert [m for _, m in got] == [_expected(msgs) for _, msgs in convs]
    lines = _lines(out)  # every line whole, every conversation once
    assert sorted(r["source"] for r in lines) == sorted(w for w, _ in convs)


def test_hf_target_path_batches_and_resumes(tiny_target_dir, tmp_path):
    from specfast.targets import load_target

    target = load_target(str(tiny_target_dir), device="cpu")
    calls = []

    class Counting:
        tokenizer = target.tokenizer

        def generate(self, prompts, max_new_tokens, temperature):
            calls.append(len(prompts))
            return target.generate(prompts, max_new_tokens, temperature)

    convs = _convs(3)
    out = regenerate(Counting(), convs, tmp_path / "r.jsonl", batch_size=2, max_new_tokens=4)
    # conv0 has 1 user turn, conv1 2, conv2 3: batch 1 is turn 0 of both then turn 1 of conv1;
    # batch 2 is conv2 alone, turn by turn.
    assert calls == [2, 1, 1, 1, 1]
    for (_, got), (_, msgs) in zip(out, convs):
        assert [m for m in got if m["role"] != "assistant"] == [
            m for m in msgs if m["role"] != "assistant"
        ]
        first_prompt = encode_prompt(
            target.tokenizer, got[: got.index(next(m for m in got if m["role"] == "user")) + 1], "t"
        )
        ids = target.generate([first_prompt], 4, 0.0)[0]
        answer = target.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert next(m for m in got if m["role"] == "assistant")["content"] == answer
    calls.clear()
    again = regenerate(Counting(), convs, tmp_path / "r.jsonl", batch_size=2, max_new_tokens=4)
    assert calls == [] and again == out


def test_hf_path_batches_conversations_of_similar_length(tiny_target_dir, tmp_path):
    from specfast.targets import load_target

    target = load_target(str(tiny_target_dir), device="cpu")
    widths = []

    class Recording:
        tokenizer = target.tokenizer

        def generate(self, prompts, max_new_tokens, temperature):
            widths.append(sorted(len(p) for p in prompts))
            return target.generate(prompts, max_new_tokens, temperature)

    words = [40, 2, 50, 3, 45, 1]  # long and short prompts interleaved
    convs = [
        (f"c{i}", [{"role": "user", "content": " ".join(["word"] * n)},
                   {"role": "assistant", "content": "x"}])
        for i, n in enumerate(words)
    ]  # fmt: skip
    out = regenerate(Recording(), convs, tmp_path / "r.jsonl", batch_size=3, max_new_tokens=2)
    # Sorted by length: the three short prompts share a batch, the three long ones the other.
    assert len(widths) == 2 and max(widths[0]) < min(widths[1])
    assert [w for w, _ in out] == [w for w, _ in convs]  # returned in the input's order


def test_hf_path_generates_nothing_past_the_token_budget(tiny_target_dir, tmp_path):
    from specfast.targets import load_target

    target = load_target(str(tiny_target_dir), device="cpu")
    tok = target.tokenizer
    asked = []

    class Recording:
        tokenizer = tok

        def generate(self, prompts, max_new_tokens, temperature):
            asked.append((sorted(len(p) for p in prompts), max_new_tokens))
            return target.generate(prompts, max_new_tokens, temperature)

    convs = _convs(3)  # 1, 2 and 3 user turns
    first = [len(encode_prompt(tok, _first_prompt(msgs), w)) for w, msgs in convs]
    budget = max(first) + 3  # room for a few tokens after every first prompt, none after that
    out = regenerate(
        Recording(), convs, tmp_path / "r.jsonl", batch_size=3, max_new_tokens=64,
        token_budget=budget,
    )  # fmt: skip
    # One call: the first turns, asking only for the room the roomiest prompt has left.
    assert asked == [(sorted(first), budget - min(first))]
    lines = {r["source"]: r for r in _lines(tmp_path / "r.jsonl")}
    for (where, got), n in zip(out, first):
        answer = got[-1]
        assert [m["role"] for m in got][-2:] == ["user", "assistant"]
        assert sum(m["role"] == "assistant" for m in got) == 1  # later turns not generated
        assert len(tok(answer["content"], add_special_tokens=False)["input_ids"]) <= budget - n
        assert lines[where]["cut_at"] == budget
    # Without a budget, or under a larger one, those records are redone; under a smaller one
    # they stand.
    asked.clear()
    regenerate(Recording(), convs, tmp_path / "r.jsonl", batch_size=3, max_new_tokens=64,
               token_budget=budget - 1)  # fmt: skip
    assert asked == []
    again = regenerate(Recording(), convs, tmp_path / "r.jsonl", batch_size=3, max_new_tokens=2)
    assert asked and [sum(m["role"] == "assistant" for m in g) for _, g in again] == [1, 2, 3]


def test_a_prompt_past_the_budget_gets_no_answer(tok, tmp_path):
    convs = [("long", [{"role": "user", "content": " ".join(["word"] * 60)},
                       {"role": "assistant", "content": "x"}])]  # fmt: skip
    with FakeServer(tok) as srv:
        out = regenerate(ServerGenerator(srv.url, tok), convs, tmp_path / "r.jsonl",
                         token_budget=20, progress=False)  # fmt: skip
    assert srv.completions == 0 and out == [("long", [])]
    assert _lines(tmp_path / "r.jsonl")[0]["cut_at"] == 20


def test_server_path_caps_answers_at_the_budget_and_stops(tok, tmp_path):
    convs = _convs(6)
    with FakeServer(tok) as srv:
        gen = ServerGenerator(srv.url, tok)
        full = regenerate(gen, convs, tmp_path / "full.jsonl", max_new_tokens=64, progress=False)
        # A budget that the first answer fills: each conversation stops after its first turn.
        first = [len(encode_prompt(tok, _first_prompt(g), w)) for w, g in full]
        srv.bodies.clear()
        budget = max(first) + 2
        out = regenerate(gen, convs, tmp_path / "r.jsonl", max_new_tokens=64,
                         token_budget=budget, progress=False)  # fmt: skip
    assert sorted(b["max_tokens"] for b in srv.bodies) == sorted(budget - n for n in first)
    for (_, got), (_, whole) in zip(out, full):
        assert got == whole[: len(got)] and sum(m["role"] == "assistant" for m in got) == 1
    # Cut: the conversations whose later turns were dropped; a one-turn one answered in full is not.
    turns = {w: sum(m["role"] == "user" for m in msgs) for w, msgs in convs}
    assert all(r.get("cut_at") == (budget if turns[r["source"]] > 1 else None)
               for r in _lines(tmp_path / "r.jsonl"))  # fmt: skip


def test_prepare_command_through_a_server(tiny_target_dir, tiny_chat_jsonl, tok, tmp_path):
    from specfast.cli import main
    from specfast.data.prepared import PreparedData

    with FakeServer(tok) as srv:
        rc = main(
            [
                "prepare",
                "--input",
                str(tiny_chat_jsonl),
                "--out",
                str(tmp_path / "p"),
                "--target",
                str(tiny_target_dir),
                "--heldout",
                "4",
                "--limit",
                "10",
                "--draft-vocab-size",
                "32",
                "--regenerate-url",
                srv.url,
                "--concurrency",
                "3",
                "--no-progress",
            ]
        )
    assert rc == 0
    assert srv.max_inflight >= 2
    data = PreparedData.load(tmp_path / "p")
    assert data.meta["regenerated"] is True
    lines = _lines(tmp_path / "p" / "regenerated.jsonl")
    assert len(lines) == 10 and all(
        m["content"].startswith("a")
        for r in lines
        for m in r["messages"]
        if m["role"] == "assistant"
    )


def test_prepare_skips_a_prompt_longer_than_max_len(tiny_target_dir, tok, tmp_path):
    from specfast.data.prepare import prepare
    from specfast.data.prepared import PreparedData

    chat = tmp_path / "chat.jsonl"
    records = [[f"short question {i}", "an answer"] for i in range(6)]
    records[2][0] = " ".join(["long"] * 200)  # past --max-len 100 on its own
    chat.write_text("".join(
        json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        + "\n" for q, a in records
    ))  # fmt: skip
    with FakeServer(tok) as srv:
        stats = prepare([chat], tmp_path / "p", tok, str(tiny_target_dir), draft_vocab_size=16,
                        max_len=100, heldout=1, regenerate_with=ServerGenerator(srv.url, tok),
                        progress=False)  # fmt: skip
    assert srv.completions == 4 and stats.samples == 4  # 5 trained on, the long one not asked
    assert len(PreparedData.load(tmp_path / "p").lengths()) == 4
    cut = [r for r in _lines(tmp_path / "p" / "regenerated.jsonl") if "cut_at" in r]
    assert [(r["messages"], r["cut_at"]) for r in cut] == [([], 100)]


# -- the real server -----------------------------------------------------------------------------


def _vllm_python() -> Path:
    return Path(os.environ.get("SPECFAST_VLLM_PYTHON", "~/vllm-venv/bin/python")).expanduser()


@pytest.mark.slow
@pytest.mark.skipif(not _vllm_python().is_file(), reason="no vLLM venv (see bench/vllm_check.py)")
def test_real_vllm_server_regenerates_like_the_target(smollm2_dir, tmp_path):
    """`vllm serve` of SmolLM2 on CPU (fp32): the checks pass against the real server, and its
    greedy answers are the target's own."""
    import socket

    from specfast.targets import load_target

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "vllm.log", "w")
    server = subprocess.Popen(
        [str(_vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model",
         str(smollm2_dir), "--dtype", "float32", "--port", str(port), "--max-model-len", "2048",
         "--enforce-eager"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # A small KV cache: by default vLLM's CPU backend asks for 92% of the machine's memory.
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        target = load_target("smollm2", device="cpu")
        gen = ServerGenerator(url, target.tokenizer, retries=0)
        deadline = time.time() + 600
        while True:
            try:
                assert gen.check() == "tokens"  # vLLM's /tokenize rendered the probe as we do
                break
            except ValueError as e:
                if "cannot reach" not in str(e) or time.time() > deadline or server.poll():
                    raise
                time.sleep(2)
        convs = [
            ("a", [{"role": "user", "content": "What is the capital of France?"},
                   {"role": "assistant", "content": "x"},
                   {"role": "user", "content": "And of Italy?"},
                   {"role": "assistant", "content": "y"}]),
            ("b", [{"role": "user", "content": "Write a haiku about rain."},
                   {"role": "assistant", "content": "z"}]),
        ]  # fmt: skip
        out = regenerate(ServerGenerator(url, target.tokenizer), convs, tmp_path / "r.jsonl",
                         max_new_tokens=24, concurrency=2, progress=False)  # fmt: skip
        for _, msgs in out:
            ctx = []
            for m in msgs:
                if m["role"] == "assistant":  # the target's own greedy answer to the same context
                    ids = target.generate([encode_prompt(target.tokenizer, ctx, "t")], 24, 0.0)[0]
                    mine = target.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    assert m["content"] == mine
                ctx.append(m)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
