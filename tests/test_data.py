"""Chat data: readers (cut-off arrays, malformed lines) shared by prepare and eval's prompts,
assistant masks under several chat templates, draft-vocabulary selection, `prepare`'s counts and
outputs, and resuming `--regenerate`."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from specfast.data.chat import TemplateError, tokenize_conversation
from specfast.data.prepare import prepare
from specfast.data.prepared import PreparedData
from specfast.data.readers import ReadStats, RecordError, iter_conversations
from specfast.data.regenerate import regenerate
from specfast.data.vocab import select_draft_vocab
from specfast.eval.prompts import read_prompts

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] "
    "+ '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{% if not (m['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONV = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3, assistant?"},
    {"role": "assistant", "content": "That makes 6, user."},
]


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize(
    "template,end",
    [(None, "<|im_end|>"), (LLAMA3, "<|eot_id|>"), (QWEN, "<|im_end|>")],
    ids=["chatml-smollm2", "llama3", "qwen"],
)
def test_mask_covers_exactly_the_answers(smollm2_dir, template, end):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if template is LLAMA3:  # as in Llama-3's own tokenizer, its markers are special tokens
        markers = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok.add_special_tokens({"additional_special_tokens": markers})
    t = tokenize_conversation(tok, CONV, template)
    # Masked tokens, decoded run by run, are each answer followed by its end-of-turn marker.
    runs, cur = [], []
    for i, m in zip(t.input_ids.tolist(), t.loss_mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["It is 4." + end, "That makes 6, user." + end]
    # Everything else (system prompt, user turns, role headers) is unmasked.
    unmasked = tok.decode(t.input_ids[~t.loss_mask].tolist())
    assert "What is 2+2?" in unmasked and "And 3+3, assistant?" in unmasked
    assert "It is 4" not in unmasked


def test_template_that_is_not_prefix_stable_is_refused(tok):
    bad = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}"
    )
    with pytest.raises(TemplateError, match="prefix"):
        tokenize_conversation(tok, CONV, bad)


def test_cut_off_json_array_recovers_complete_records(tmp_path):
    recs = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(5)
    ]
    text = json.dumps(recs, indent=2)
    cut = text[: text.index('"q4"') + 2]  # stop inside record 4
    path = tmp_path / "cut.json"
    path.write_text(cut)
    stats = ReadStats()
    got = list(iter_conversations(path, stats))
    assert [m[0]["content"] for _, m in got] == ["q0", "q1", "q2", "q3"]
    assert stats.truncated_bytes > 0 and stats.bad == 0


def test_invalid_record_inside_a_complete_array_names_its_index(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '[{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "yo"}]}, {"messages": [}, {"messages": []}]'
    )
    with pytest.raises(RecordError, match=r"array index 1"):
        list(iter_conversations(path))


def test_jsonl_bad_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    good = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({"text": "no conversation"}),
        "",
        json.dumps(good),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    stats = ReadStats()
    got = list(iter_conversations(path, stats))
    assert len(got) == 2 and got[1][0].endswith(":6")
    assert stats.bad == 3
    assert any(":2: invalid JSON" in e for e in stats.examples)
    assert any(":3: turn 0 has unknown role 'wizard'" in e for e in stats.examples)
    assert any(":4: no 'conversations' or 'messages'" in e for e in stats.examples)


def test_roles_merge_and_leading_assistant_turns_drop(tmp_path):
    rec = {
        "conversations": [
            {"from": "gpt", "value": "orphan"},
            {"from": "human", "value": "a"},
            {"from": "human", "value": "b"},
            {"from": "gpt", "value": "c"},
        ]
    }
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    ((_, msgs),) = list(iter_conversations(path))
    assert msgs == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]


def test_draft_vocab_picks_most_frequent_ties_by_id_sorted(seed):
    counts = np.array([5, 9, 0, 9, 1, 5, 7, 0])
    v = select_draft_vocab(counts, 4)
    # by count: 1 (9), 3 (9), 6 (7), then 0 and 5 tie at 5 -> lower id 0
    assert v.draft_ids.tolist() == [0, 1, 3, 6]
    assert v.coverage == pytest.approx(30 / 36)
    assert torch.equal(v.draft_ids - v.d2t, torch.arange(4))
    assert v.t2d.nonzero().flatten().tolist() == [0, 1, 3, 6]
    with pytest.raises(ValueError):
        select_draft_vocab(counts, 9)


def test_prepare_counts_truncation_and_writes_heldout(tmp_path, tiny_target_dir, tiny_chat_jsonl):
    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    common = dict(draft_vocab_size=32, max_len=60, heldout=5, progress=False)
    s_trunc = prepare([tiny_chat_jsonl], tmp_path / "a", tok, "tiny", **common)
    s_drop = prepare([tiny_chat_jsonl], tmp_path / "b", tok, "tiny", overlong="drop", **common)
    assert s_trunc.truncated > 0 and s_drop.dropped_overlong == s_trunc.truncated
    assert s_trunc.conversations == 55 and s_trunc.heldout == 5
    data = PreparedData.load(tmp_path / "a")
    assert len(data) == s_trunc.samples and data.lengths().max() <= 60
    assert int(data.loss_mask.sum()) == s_trunc.supervised_tokens
    assert data.vocab.size == 32 and 0 < data.vocab.coverage <= 1
    held = [json.loads(x) for x in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 5 and held[0]["messages"][0]["role"] == "user"
    assert len(read_prompts(tmp_path / "a" / "heldout.jsonl")) == 5  # eval reads it as prompts
    # the most frequent supervised token is in the vocabulary
    labels = data.input_ids[data.loss_mask].long()
    assert bool(data.vocab.t2d[torch.bincount(labels).argmax()])


def test_read_prompts_formats_and_errors(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        json.dumps({"turns": ["hi", "and then?"]})
        + "\n\n"
        + json.dumps(
            {
                "source": "x",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                ],
            }
        )
        + "\n"
        + json.dumps(
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}
        )
        + "\n"
    )
    ps = read_prompts(f)
    assert [p.turns for p in ps] == [["hi", "and then?"], ["a", "c"], ["q"]]
    assert ps[1].system == "be brief" and ps[1].where == f"{f}:3"
    assert len(read_prompts(f, limit=2)) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"turns": ["ok"]}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_prompts(bad)
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no user turn"):
        read_prompts(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_prompts(tmp_path / "missing.jsonl")


def test_prepare_and_eval_read_one_record_alike(tmp_path):
    """One reader (specfast.data.readers): the same role table and checks, then each side's
    policy: prepare merges consecutive turns of a role, eval answers each user turn."""
    rec = {
        "conversations": [
            {"from": "SYSTEM", "value": "be kind"},
            {"from": "human", "value": "a"},
            {"from": "human", "value": "b"},
            {"from": "bing", "value": "c"},
            {"from": "user", "value": " "},
            {"from": "Human", "value": "d"},
        ]
    }
    weird = {"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]}
    path = tmp_path / "chat.json"  # a JSON array, as ShareGPT ships
    path.write_text(json.dumps([rec, weird]))
    stats = ReadStats()
    ((_, msgs),) = list(iter_conversations(path, stats))
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "a\n\nb" and stats.bad == 1
    assert "array index 1: turn 1 has unknown role 'wizard'" in stats.examples[0]
    path.write_text(json.dumps([rec]))
    (prompt,) = read_prompts(path)
    assert prompt.turns == ["a", "b", "d"] and prompt.system == "be kind"
    assert prompt.where == f"{path}: array index 0"
    path.write_text(json.dumps([rec, weird]))
    with pytest.raises(RecordError, match="array index 1: turn 1 has unknown role 'wizard'"):
        read_prompts(path)
    path.write_text(json.dumps([rec, rec])[:-20])  # cut off: prepare recovers, eval refuses
    assert len(list(iter_conversations(path))) == 1
    with pytest.raises(RecordError, match="array index 1: the file is cut off"):
        read_prompts(path)


class EchoTarget:
    """Answers every prompt with its own last token, counting the prompts it saw."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, 0

    def generate(self, prompts, max_new_tokens, temperature=0.0):
        self.prompts += len(prompts)
        return [p[-1:] for p in prompts]


def test_regenerate_resumes_after_a_torn_line(tmp_path, tok):
    convs = [
        (f"src{i}", [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "old"}])
        for i in range(5)
    ]
    path = tmp_path / "regenerated.jsonl"
    first = regenerate(EchoTarget(tok), convs[:2], path, batch_size=2)
    assert [m[-1]["role"] for _, m in first] == ["assistant", "assistant"]
    assert all(m[-1]["content"] != "old" for _, m in first)
    with open(path, "a") as f:
        f.write('{"source": "src2", "mess')  # a run killed mid-line
    target = EchoTarget(tok)
    again = regenerate(target, convs, path, batch_size=2)
    assert target.prompts == 3 and again[:2] == first
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["source"] for r in lines] == [f"src{i}" for i in range(5)]
