"""Test setup: Triton kernels run in the interpreter on this CPU machine. It must be set before any
kernel is defined, so it happens here, before test modules import specfast.kernels."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def seed():
    """A fresh seed per test, printed so a failure can be replayed (pytest -s shows it)."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed={s}")
    return s


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2 target, converted from its GGUF once per machine (~30 s the first
    time)."""
    from specfast.targets import resolve_target_path

    return resolve_target_path("smollm2")


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template: fast, and a real HF
    folder."""

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_target")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked next-token distributions, so a draft has something to learn
        model.model.embed_tokens.weight.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_jsonl(tmp_path_factory):
    """A small ShareGPT-style JSONL with multi-turn conversations."""
    import json
    import random

    rng = random.Random(1234)
    words = (
        "the of and to in is you that it he was for on are as with his they at be this from".split()
    )
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            turns = []
            for _ in range(rng.randint(1, 3)):
                turns.append(
                    {"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(3, 12)))}
                )
                turns.append(
                    {"from": "gpt", "value": " ".join(rng.choices(words, k=rng.randint(5, 30)))}
                )
            f.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_target_dir, tiny_chat_jsonl):
    """tiny_chat_jsonl prepared for the tiny target."""
    from transformers import AutoTokenizer

    from specfast.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    prepare(
        [tiny_chat_jsonl],
        out,
        tok,
        str(tiny_target_dir),
        draft_vocab_size=64,
        max_len=96,
        heldout=4,
        progress=False,
    )
    return out
