"""Vision-language (Qwen2.5-VL) and speech (Qwen3-ASR) targets: the target against its own model,
the draft's positions against vLLM's rule for mRoPE targets, prepare with media, and the whole
path (prepare -> train online and offline -> export -> eval with the media in the target's
context) on tiny random models built in the test."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.tiny_multimodal import (
    build_tiny_asr,
    build_tiny_vlm,
    data_url,
    png_bytes,
    write_asr_chat,
    write_vlm_chat,
)

from specfast.data.media import MediaStore, MediaTable
from specfast.data.prepare import prepare
from specfast.data.prepared import PreparedData
from specfast.pipeline import doc_layout
from specfast.targets import MultimodalTarget, load_target
from specfast.ttt import draft_positions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def vlm_dir(tmp_path_factory, smollm2_dir):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", smollm2_dir)


@pytest.fixture(scope="session")
def asr_dir(tmp_path_factory, smollm2_dir):
    return build_tiny_asr(tmp_path_factory.mktemp("asr") / "model", smollm2_dir)


@pytest.fixture(scope="session")
def vlm_chat(tmp_path_factory):
    return write_vlm_chat(tmp_path_factory.mktemp("vlm_chat") / "chat.jsonl")


@pytest.fixture(scope="session")
def vlm_prepared(tmp_path_factory, vlm_dir, vlm_chat):
    out = tmp_path_factory.mktemp("vlm_prepared") / "data"
    prepare([vlm_chat], out, None, str(vlm_dir), draft_vocab_size=64, max_len=256, heldout=3,
            progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def vlm_target(vlm_dir):
    return load_target(str(vlm_dir))


def _reference(model, ids, feats):
    """The model's own forwards of one document, positions computed by the model itself: (its
    base model's output with hidden states, its logits)."""
    kw = dict(feats.kwargs) if feats else {}
    if "image_grid_thw" in kw:
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int()[None]
    base = model.model(input_ids=ids[None], output_hidden_states=True, use_cache=False, **kw)
    model.model.rope_deltas = None  # Qwen2.5-VL caches them between calls
    logits = model(input_ids=ids[None], use_cache=False, **kw).logits[0].float()
    return base, logits


@pytest.mark.parametrize("kind", ["vlm", "asr"])
def test_target_matches_its_own_model(kind, request, tmp_path):
    """forward_packed on a row of two documents with media == the HF model run on each document
    alone (its own positions and media path): aux hidden states, final hidden state, teacher
    logits (= the model's logits) and argmax."""
    if kind == "vlm":
        folder, chat = request.getfixturevalue("vlm_dir"), write_vlm_chat(tmp_path / "c.jsonl")
    else:
        folder, chat = request.getfixturevalue("asr_dir"), write_asr_chat(tmp_path / "c.jsonl")
    prepare([chat], tmp_path / "p", None, str(folder), draft_vocab_size=32, max_len=256,
            heldout=1, progress=False)  # fmt: skip
    data = PreparedData.load(tmp_path / "p")
    target = load_target(str(folder))
    assert isinstance(target, MultimodalTarget)
    ids, mask, offsets = data.read([2, 3], 256)
    doc_ids, doc_pos = doc_layout(offsets.diff())
    out = target.forward_packed(ids, doc_ids)
    assert int((ids == target.processor.placeholder_id).sum()) > 0
    for d in range(2):
        a, b = int(offsets[d]), int(offsets[d + 1])
        media = data.media.samples[[2, 3][d]]
        feats = target.processor.features([MediaStore(data.root).get(r) for r in media])
        ref, logits = _reference(target.model, ids[a:b], feats)
        torch.testing.assert_close(out.final_hidden[a:b], ref.last_hidden_state[0])
        aux = torch.cat([ref.hidden_states[i + 1][0] for i in target.aux_layer_ids], -1)
        torch.testing.assert_close(out.aux_hidden[a:b], aux, rtol=1e-4, atol=1e-4)
        teacher = target.teacher_logits(out.final_hidden[a:b], torch.arange(target.vocab_size))
        torch.testing.assert_close(teacher, logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(out.argmax[a:b], logits.argmax(-1))
    if kind == "asr":  # equal mRoPE rows = token index: the draft's positions are unchanged
        assert torch.equal(out.positions, doc_pos)
    else:  # after an image the positions run behind the token index
        assert bool((out.positions <= doc_pos).all()) and bool((out.positions < doc_pos).any())


def vllm_mrope_positions(tokens, image_token, grids, merge):
    """vLLM 0.32's Qwen2.5-VL `get_mrope_input_positions` (written from its definition): text
    runs continue from the largest position so far + 1; an image of (t, h, w) patches at token
    offset o gets its (t, h/merge, w/merge) grid indices + the position where it starts."""
    rows, st, pos_next = [], 0, 0
    runs, i = [], 0
    while i < len(tokens):
        if tokens[i] == image_token:
            j = i
            while j < len(tokens) and tokens[j] == image_token:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    assert len(runs) == len(grids)
    for (off, end), (t, h, w) in zip(runs, grids):
        text_len = off - st
        rows.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + pos_next)
        gi = np.indices((t, h // merge, w // merge)).reshape(3, -1)
        assert gi.shape[1] == end - off
        rows.append(gi + text_len + pos_next)
        pos_next = int(np.concatenate(rows, 1).max()) + 1
        st = end
    if st < len(tokens):
        rows.append(np.broadcast_to(np.arange(len(tokens) - st), (3, len(tokens) - st)) + pos_next)
    pos = np.concatenate(rows, axis=1)
    return torch.from_numpy(pos.copy()), int(pos.max()) + 1 - len(tokens)


def test_draft_positions_follow_vllms_rule_for_mrope(vlm_target):
    """vLLM's proposer gives a plain-RoPE draft row 0 of the target's mRoPE positions, + 1 per
    draft step, and token index + delta for decoded tokens: the target's positions, ttt's rule
    and the eval cache agree with that on a prompt with two images of different grids."""
    proc = vlm_target.processor
    imgs = [png_bytes(112, 56, 1), png_bytes(112, 112, 2)]
    from specfast.data.media import Media

    media = [Media("image", b, "png") for b in imgs]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                     {"type": "image"}, {"type": "text", "text": "compare"}]}
    ]  # fmt: skip
    ids = vlm_target.encode_prompt(messages, media)
    feats = proc.features(media)
    grids = [tuple(g) for g in feats.grid.tolist()]
    expected, delta = vllm_mrope_positions(ids, proc.placeholder_id, grids, proc.merge)
    t = torch.tensor(ids)
    out = vlm_target.forward_packed(t, torch.zeros_like(t), media=_one_doc(media))
    assert torch.equal(out.positions, expected[0])
    doc_pos = torch.arange(len(ids))
    assert torch.equal(draft_positions(doc_pos, expected), expected[0])
    assert torch.equal(draft_positions(doc_pos, None), doc_pos)
    assert delta < 0  # 4 + 16 image tokens advance the positions by 2 + 4
    cache = vlm_target.new_cache(media)
    vlm_target.forward_cached(ids, cache)
    L = len(ids)
    assert torch.equal(cache.draft_positions(0, L), expected[0])
    assert torch.equal(cache.draft_positions(L, L + 3), torch.arange(L, L + 3) + delta)


def _one_doc(media):
    from specfast.data.media import BatchMedia

    return BatchMedia([media], ["prompt"])


def test_prepare_reads_media_and_reports_bad_ones(tmp_path, vlm_dir, vlm_chat, caplog):
    """Media parts from data: URLs and local files; placeholder and prompt tokens out of the loss;
    media stored once per content hash; missing / unreadable / remote media reported by
    file:line; a sample with media over --max-len dropped whole, never cut."""
    lines = vlm_chat.read_text().splitlines()
    bad = [
        {"type": "image_url", "image_url": {"url": "images/missing.png"}},
        {"type": "image_url", "image_url": {"url": data_url(b"not an image", "image/png")}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    for part in bad:
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": "what"}]},
                {"role": "assistant", "content": "a cat"}]  # fmt: skip
        lines.insert(1, json.dumps({"messages": msgs}))
    chat = vlm_chat.parent / "with_bad.jsonl"
    chat.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="specfast"):
        stats = prepare([chat], tmp_path / "p", None, str(vlm_dir), draft_vocab_size=64,
                        max_len=256, heldout=2, progress=False)  # fmt: skip
    assert stats.bad_records == 3
    log = caplog.text
    assert f"{chat}:2: turn 0 part 0: remote URL 'https://example.com/cat.png'" in log
    assert f"{chat}:3: turn 0 part 0: not a readable image" in log
    assert f"{chat}:4: turn 0 part 0: {chat.parent}/images/missing.png: no such file" in log
    data = PreparedData.load(tmp_path / "p")
    meta = data.meta["media"]
    # the text-only record is the last one: held out
    assert meta["samples_with_media"] == len(data) and meta["media_items"] == len(data)
    assert meta["distinct_media"] == meta["media_items"] - 1  # records 0 and 1 share an image
    assert len(list((data.root / "media").iterdir())) == meta["distinct_media"] + 1  # + held out
    image_id = json.loads((vlm_dir / "config.json").read_text())["image_token_id"]
    store = MediaStore(data.root)
    from specfast.targets.multimodal import MediaProcessor

    proc = MediaProcessor(vlm_dir)
    for i in range(len(data)):
        ids, mask = data.sample(i)
        ph = ids == image_id
        assert not bool((mask & ph).any())  # media tokens are never supervised
        counts = proc.features([store.get(r) for r in data.media.samples[i]]).counts
        assert int(ph.sum()) == sum(counts)
        first_answer = int(mask.nonzero()[0])
        assert first_answer > int(ph.nonzero()[-1])  # the prompt (and its image) is not either
    held = [json.loads(x) for x in (data.root / "heldout.jsonl").read_text().splitlines()]
    paths = [p["image"] for r in held for m in r["messages"] if isinstance(m["content"], list)
             for p in m["content"] if p["type"] == "image"]  # fmt: skip
    assert paths and all(Path(p).is_file() for p in paths)

    # --max-len below the longer samples: samples with media go whole, text ones are cut
    stats = prepare([chat], tmp_path / "short", None, str(vlm_dir), draft_vocab_size=64,
                    max_len=34, heldout=2, progress=False)  # fmt: skip
    short = PreparedData.load(tmp_path / "short")
    assert short.meta["media"]["dropped_overlong_with_media"] > 0
    for i in short.media.samples:
        assert short.sample(i)[0].numel() <= 34
    with pytest.raises(ValueError, match="never cut"):
        longest = int(np.argmax(data.lengths()))
        data.read([longest], int(data.lengths()[longest]) - 1)


def test_media_must_come_with_their_placeholders(vlm_target, vlm_prepared):
    data = PreparedData.load(vlm_prepared)
    ids, mask, offsets = data.read([0], 256)
    doc_ids, _ = doc_layout(offsets.diff())
    with pytest.raises(ValueError, match="no media were given"):
        vlm_target.forward_packed(ids.clone(), doc_ids)  # a copy: the media stay behind
    table = MediaTable.load(vlm_prepared)
    assert table is not None and 0 in table.samples


def _train_cfg(**kw):
    from specfast.train.config import TrainConfig

    common = dict(max_steps=3, ttt_steps=2, batch_tokens=256, warmup_steps=1, save_every=3,
                  progress=False, tensorboard=False)  # fmt: skip
    return TrainConfig(**common, **kw)


def test_vlm_end_to_end(tmp_path, vlm_dir, vlm_prepared):
    """prepare -> train online -> capture -> train offline (same losses, no media read) ->
    export (plain RoPE) -> eval on held-out prompts with their images (greedy speculative
    output = the target's own)."""
    from specfast.capture import capture
    from specfast.eval.evaluate import evaluate, load_for_eval
    from specfast.eval.prompts import read_prompts
    from specfast.export import export_draft
    from specfast.train.metrics import read_metrics
    from specfast.train.trainer import train

    train(_train_cfg(data=str(vlm_prepared), out=str(tmp_path / "online"), target=str(vlm_dir)))
    capture(vlm_prepared, tmp_path / "shards", str(vlm_dir), batch_tokens=256, dtype="float32",
            progress=False)  # fmt: skip
    text_view = tmp_path / "shards" / "text_target"
    assert not list(text_view.glob("preprocessor_config.json"))
    train(_train_cfg(data=str(tmp_path / "shards"), out=str(tmp_path / "off"),
                     target=str(text_view)))  # fmt: skip
    on = read_metrics(tmp_path / "online" / "metrics.jsonl")
    off = read_metrics(tmp_path / "off" / "metrics.jsonl")
    assert [r["supervised"] for r in on] == [r["supervised"] for r in off]
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in off]), torch.tensor([r["loss"] for r in on]),
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip
    # training feeds the draft the target's own positions (row 0 of mRoPE), online and offline
    from specfast.pipeline import open_offline, open_online
    from specfast.shards import ShardDataset
    from specfast.targets.heads import HeadsOnlyTarget

    cpu = torch.device("cpu")
    vlm = load_target(str(vlm_dir))
    heads = HeadsOnlyTarget(str(text_view), vlm.aux_layer_ids, cpu, torch.float32, "text")
    online = open_online(PreparedData.load(vlm_prepared), vlm, 256, 0, cpu)
    offline = open_offline(ShardDataset(tmp_path / "shards"), heads, 256, 0, cpu)
    behind = False
    for _ in range(3):
        a, b = online.next(), offline.next()
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.positions, b.positions)
        in_doc = doc_layout(torch.bincount(a.doc_ids))[1]
        assert bool((a.positions <= in_doc).all())
        behind |= bool((a.positions < in_doc).any())  # after an image: behind the token index
    assert behind
    export = export_draft(tmp_path / "online", tmp_path / "export", dtype=torch.float32)
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["rope_scaling"] is None and "mrope_section" not in json.dumps(cfg)
    target, draft = load_for_eval(export, str(vlm_dir))
    prompts = read_prompts(vlm_prepared / "heldout.jsonl")
    assert any(p.media and p.media[0] for p in prompts)
    res = evaluate(target, draft, prompts, k=3, max_new_tokens=12, progress=False)
    assert res["num_drafts"] > 0 and res["greedy_mismatched_turns"] == 0

    # the proposer is fed the rule's positions: the prompt's row 0, then token index + delta
    from specfast.eval.decode import generate_speculative
    from specfast.eval.proposer import Eagle3Proposer
    from specfast.eval.stats import AcceptanceStats

    class Recording(Eagle3Proposer):
        fed: list = []

        def extend(self, next_tokens, aux_hidden, positions=None):
            self.fed += torch.as_tensor(positions).tolist()
            super().extend(next_tokens, aux_hidden, positions)

    p = next(p for p in prompts if p.media and p.media[0])
    ids = target.encode_prompt([{"role": "user", "content": p.turns[0]}], p.media[0])
    rec = Recording(draft)
    out = generate_speculative(target, rec, ids, 3, 0.0, 10, target.eos_token_ids(), None,
                               AcceptanceStats(3), p.media[0])  # fmt: skip
    cache = target.new_cache(p.media[0])
    target.forward_cached(ids, cache)
    L, n = len(ids), len(rec.fed)
    assert n >= L and rec.fed[:L] == cache.prompt_row0.tolist()
    assert rec.fed[L:] == list(range(L + cache.delta, n + cache.delta)) and cache.delta < 0
    assert len(out) > 0


def test_asr_end_to_end(tmp_path, asr_dir):
    """The speech target: prepare with input_audio / local WAV parts -> train online -> export ->
    eval on held-out prompts with their audio."""
    from specfast.eval.evaluate import evaluate, load_for_eval
    from specfast.eval.prompts import read_prompts
    from specfast.export import export_draft
    from specfast.train.trainer import train

    chat = write_asr_chat(tmp_path / "chat" / "chat.jsonl")
    prepare([chat], tmp_path / "p", None, str(asr_dir), draft_vocab_size=64, max_len=256,
            heldout=2, progress=False)  # fmt: skip
    data = PreparedData.load(tmp_path / "p")
    assert data.meta["media"]["kind"] == "audio" and len(data.media.samples) == len(data)
    train(_train_cfg(data=str(tmp_path / "p"), out=str(tmp_path / "run"), target=str(asr_dir)))
    export = export_draft(tmp_path / "run", tmp_path / "export", dtype=torch.float32)
    target, draft = load_for_eval(export, str(asr_dir))
    res = evaluate(target, draft, read_prompts(tmp_path / "p" / "heldout.jsonl"), k=2,
                   max_new_tokens=8, progress=False)  # fmt: skip
    assert res["num_drafts"] > 0 and res["greedy_mismatched_turns"] == 0


@pytest.mark.slow
def test_vllm_loads_the_tiny_vlm_export(tmp_path):
    """bench/vllm_multimodal_check.py: the tiny VLM's export loads in vLLM (CPU) as the EAGLE-3
    draft of the tiny Qwen2.5-VL and decodes the same prompts to the same tokens as specfast eval
    (text prompts: vLLM's Qwen2.5-VL image processing needs torchvision, which the CPU venv
    lacks)."""
    venv = Path.home() / "vllm-venv" / "bin" / "python"
    if not venv.is_file():
        pytest.skip("no ~/vllm-venv (see README: Vision and speech targets)")
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "vllm_multimodal_check.py"),
            "--work",
            str(tmp_path),
            "--text-only",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "vllm loaded the draft" in r.stdout
    assert "prompt ids identical: 4/4; outputs identical: 4/4" in r.stdout
    vllm_row = next(x for x in r.stdout.splitlines() if x.startswith("vLLM 0.32"))
    ours = next(x for x in r.stdout.splitlines() if x.startswith("specfast eval"))
    assert vllm_row.split()[2:] == ours.split()[2:]  # drafts, draft tokens, accepted, tau
