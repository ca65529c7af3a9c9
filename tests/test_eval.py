"""`specfast eval`: speculative decoding is exact at temperature 0 (token for token the target's own
greedy generation, HF `generate`), distribution-preserving when sampling (statistical tests that a
wrong acceptance rule fails), the draft's inference path computes what training defines (dense
reference), and τ / per-position counts follow vLLM's definitions. Tiny random models built here,
no download."""

import math
import random
from pathlib import Path

import pytest
import torch

from specfast.data.chat import encode_prompt
from specfast.eval import decode
from specfast.eval.decode import accept_sampled, generate_plain, generate_speculative
from specfast.eval.evaluate import evaluate
from specfast.eval.proposer import Eagle3Proposer, Proposal
from specfast.eval.stats import AcceptanceStats
from specfast.model import DraftConfig, Eagle3Draft
from specfast.model.load import draft_from_weights
from specfast.targets import HFTarget

WORDS = ["<unk>", "<eos>", "<user>", "<assistant>", "<system>"] + [f"w{i}" for i in range(11)]
EOS = 1
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_target_folder(path: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", chat_template=TEMPLATE
    ).save_pretrained(path)
    torch.manual_seed(seed)
    # A large init range gives peaked, varied next-token distributions (no near-ties, no uniform
    # soup).
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=False,
        eos_token_id=EOS,
        bos_token_id=None,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def make_draft(target, seed: int, draft_vocab: int = 12) -> Eagle3Draft:
    """A random draft over a draft vocabulary that skips some target tokens (d2t offsets are
    non-trivial)."""
    torch.manual_seed(seed)
    cfg = DraftConfig(
        hidden_size=32,
        target_hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=len(WORDS),
        draft_vocab_size=draft_vocab,
        aux_layer_ids=list(target.aux_layer_ids),
        target_num_layers=8,
    )
    d = Eagle3Draft(cfg)
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)  # peaked proposals, unlike the target's
    keep = [EOS] + sorted(random.Random(seed).sample(range(5, len(WORDS)), draft_vocab - 1))
    d.set_vocab(torch.tensor(keep))
    tensors = {k: v.clone() for k, v in d.trainable_state_dict().items()}
    return draft_from_weights(tensors, cfg, target)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    torch.set_num_threads(1)  # tiny shapes: threads only add overhead on a shared machine
    return HFTarget(make_target_folder(tmp_path_factory.mktemp("tiny-target")))


@pytest.fixture(scope="module")
def drafts(target):
    return [make_draft(target, seed) for seed in (1, 2)]


def random_prompt(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(11)}" for _ in range(n))


def prompt_ids(target, rng) -> list[int]:
    text = random_prompt(rng, rng.randint(1, 8))
    return encode_prompt(target.tokenizer, [{"role": "user", "content": text}], "t")


def greedy_no_cache(target, ids: list[int], n: int) -> list[int]:
    """The target's greedy continuation ignoring EOS, recomputed from scratch each token (the
    oracle's knowledge; independent of any cache)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(target.model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


class OracleProposer:
    """Proposes the target's known greedy continuation, each token corrupted with probability
    `wrong`: exercises every accepted count 0..K and the all-accepted bonus path."""

    def __init__(self, references: dict, wrong: float, seed: int):
        self.references, self.wrong, self.rng = references, wrong, random.Random(seed)

    def reset(self):
        self.seq, self.ref, self.start = [], None, 0

    def extend(self, next_tokens, aux_hidden):
        if self.ref is None:  # first call: prompt[1:] + the first generated token
            self.ref = self.references[tuple(next_tokens[:-1])]
            self.start = len(next_tokens) - 1
        self.seq += list(next_tokens)

    def propose(self, k, temperature, generator):
        done = len(self.seq) - self.start
        tokens = [self.ref[done + j] if done + j < len(self.ref) else 5 for j in range(k)]
        tokens = [(t + 1) % len(WORDS) if self.rng.random() < self.wrong else t for t in tokens]
        return Proposal(tokens, None)


def test_greedy_speculative_equals_target_greedy(target, drafts):
    rng = random.Random(0)
    max_new = 20
    prompts = [prompt_ids(target, rng) for _ in range(6)]
    refs = {tuple(p): target.generate([p], max_new)[0] for p in prompts}  # HF `generate`
    known = {tuple(p[1:]): greedy_no_cache(target, p, max_new + 4) for p in prompts}
    assert any(len(r) == max_new for r in refs.values())
    assert any(r[-1] == EOS for r in refs.values())
    eos = target.eos_token_ids()
    assert eos == {EOS}
    accepted = 0
    for p in prompts:
        assert generate_plain(target, p, 0.0, max_new, eos) == refs[tuple(p)]
    for k in (1, 2, 4):
        oracle = OracleProposer(known, wrong=0.3, seed=k)
        for proposer in [Eagle3Proposer(d) for d in drafts] + [oracle]:
            stats = AcceptanceStats(k)
            for p in prompts:
                out = generate_speculative(target, proposer, p, k, 0.0, max_new, eos, None, stats)
                assert out == refs[tuple(p)], (k, proposer)
            accepted += stats.num_accepted_tokens
            if proposer is oracle:  # every accepted count happened, including all K (bonus token)
                assert stats.accepted_per_position[-1] > 0
                assert stats.num_accepted_tokens < stats.num_draft_tokens
    assert accepted > 0


def test_perfect_proposer_gives_tau_k_plus_one(target):
    rng = random.Random(1)
    prompts = [prompt_ids(target, rng) for _ in range(3)]
    refs = {tuple(p[1:]): greedy_no_cache(target, p, 34) for p in prompts}
    for k in (1, 3):
        stats = AcceptanceStats(k)
        for p in prompts:
            generate_speculative(
                target,
                OracleProposer(refs, 0.0, 0),
                p,
                k,
                0.0,
                30,
                target.eos_token_ids(),
                None,
                stats,
            )
        assert stats.acceptance_length == k + 1
        assert stats.accepted_per_position == [stats.num_drafts] * k


def test_acceptance_accounting_hand_made_trace():
    s = AcceptanceStats(3)
    for n in (2, 0, 3, 1):
        s.observe(n)
    d = s.to_dict()
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (4, 12, 6)
    assert d["accepted_per_position"] == [3, 2, 1]
    assert d["acceptance_length"] == pytest.approx(1 + 6 / 4)
    assert d["acceptance_rate_per_position"] == pytest.approx([0.75, 0.5, 0.25])
    assert d["draft_acceptance_rate"] == pytest.approx(0.5)
    other = AcceptanceStats(3)
    other.observe(3)
    s.merge(other)
    assert s.accepted_per_position == [4, 3, 2]
    assert s.acceptance_length == pytest.approx(1 + 9 / 5)
    with pytest.raises(ValueError):
        s.observe(4)


# --- sampling: the output distribution is the target's -----------------------------------------


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of χ²(df) at significance ~1e-4 (Wilson–Hilferty)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson χ² of counts against probs, cells with expected count < 5 pooled into one."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def wrong_resample_from_p(p, q, proposals, generator):
    """A plausible-looking bug: on rejection draw from p instead of norm(max(0, p − q))."""
    for j, x in enumerate(proposals):
        if float(torch.rand((), generator=generator)) * float(q[j, x]) < float(p[j, x]):
            continue
        return j, decode.sample(p[j], generator)
    return len(proposals), decode.sample(p[len(proposals)], generator)


def wrong_accept_always(p, q, proposals, generator):
    return len(proposals), decode.sample(p[len(proposals)], generator)


def test_rejection_sampling_preserves_target_distribution():
    g = torch.Generator().manual_seed(0)
    V, K, N = 6, 2, 12000
    p = torch.softmax(torch.randn(K + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(K, V, generator=g) * 1.5, -1)
    q[:, 0] = 0  # token 0 lies outside the draft vocabulary
    q = q / q.sum(-1, keepdim=True)

    def emitted_counts(rule):
        gen = torch.Generator().manual_seed(1)
        counts = torch.zeros(K + 1, V)
        for _ in range(N):
            proposals = [decode.sample(q[j], gen) for j in range(K)]
            n, nxt = rule(p, q, proposals, gen)
            tokens = proposals[:n] + [nxt]
            # Given tokens 0..j-1 accepted, token j is distributed as p[j] (these rows do not
            # depend on the prefix); j = K is the bonus token.
            for j in range(n + 1):
                counts[j, tokens[j]] += 1
        return counts

    def passes(rule):
        counts = emitted_counts(rule)
        stats = [chi2(counts[j], p[j]) for j in range(K + 1)]
        return all(s < chi2_critical(df) for s, df in stats)

    assert passes(accept_sampled)
    assert not passes(wrong_resample_from_p)
    assert not passes(wrong_accept_always)


def exact_marginals(target, ids: list[int], temperature: float, n: int) -> list[torch.Tensor]:
    """The target's exact distribution of each of the first n generated tokens, every
    continuation enumerated (V^(n-1) sequences in the last batch)."""
    V = len(WORDS)
    prefixes, joint, marginals = [[]], torch.ones(1), []
    for _ in range(n):
        with torch.no_grad():
            batch = torch.tensor([ids + pre for pre in prefixes])
            logits = target.model(batch).logits[:, -1].float()
        # over prefix + token
        joint = (joint[:, None] * torch.softmax(logits / temperature, -1)).reshape(-1)
        marginals.append(joint.view(-1, V).sum(0))
        prefixes = [pre + [t] for pre in prefixes for t in range(V)]
    return marginals


def test_speculative_sampling_matches_target_distribution(target, drafts, monkeypatch):
    """End to end through the target, the draft and both caches: with K=2, tokens 2 and 3 come out
    of verification (accepted drafts or corrections; the bonus token is covered above); each
    marginal must be the target's own. The same test with a wrong rule must fail."""
    temperature, k, n, length = 0.8, 2, 400, 3
    ids = encode_prompt(target.tokenizer, [{"role": "user", "content": "w3 w1 w4"}], "t")
    exact = exact_marginals(target, ids, temperature, length)
    proposer = Eagle3Proposer(drafts[0])

    def statistic(seed):
        gen = torch.Generator().manual_seed(seed)
        stats = AcceptanceStats(k)
        counts = torch.zeros(length, len(WORDS))
        for _ in range(n):
            out = generate_speculative(
                target, proposer, ids, k, temperature, length, set(), gen, stats
            )
            counts[torch.arange(length), torch.tensor(out)] += 1
        assert 0 < stats.accepted_per_position[-1]
        assert stats.num_accepted_tokens < stats.num_draft_tokens
        results = [chi2(counts[i], exact[i]) for i in range(length)]
        return max(s / chi2_critical(df) for s, df in results)

    assert statistic(0) < 1
    monkeypatch.setattr(decode, "accept_sampled", wrong_resample_from_p)
    assert statistic(0) > 1


# --- the draft's inference path is the training semantics ----------------------------------------


def aux_from_scratch(target, x: list[int]) -> torch.Tensor:
    """The target's aux hidden states for x, one forward without any cache: [1, len(x), 3H]."""
    with torch.no_grad():
        hs = target.model(torch.tensor([x]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i + 1] for i in target.aux_layer_ids], -1)


def dense_chain_logits(
    draft: Eagle3Draft, aux: torch.Tensor, x: list[int], chain: list[int]
) -> torch.Tensor:
    """What training (specfast/ttt.py) defines, recomputed densely from scratch for x[0..L]: step 0
    on every position t (token x[t+1], fc(a[t]), RoPE position t, causal attention), then the chain
    at t = L-1: chain token j (a target id) with the previous step's hidden output at position
    L-1+j, attending every step-0 key and the earlier chain keys. Returns the logits
    [len(chain)+1, V_draft]."""
    L = len(x) - 1
    nh, nkv = draft.config.num_attention_heads, draft.config.num_key_value_heads
    keys, values = [], []

    def attend(causal):
        def fn(q, k, v):
            keys.append(k)
            values.append(v)
            K_, V_ = torch.cat(keys, 2), torch.cat(values, 2)
            T, S = q.shape[2], K_.shape[2]
            qg = q.view(1, nkv, nh // nkv, T, -1)  # query head h reads kv head h // (nh / nkv)
            scores = torch.einsum("bngtd,bnsd->bngts", qg, K_) / math.sqrt(q.shape[-1])
            if causal:
                scores = scores.masked_fill(~torch.ones(T, S).tril().bool(), float("-inf"))
            out = torch.einsum("bngts,bnsd->bngtd", torch.softmax(scores, -1), V_)
            return out.reshape(1, nh, T, -1)

        return fn

    with torch.no_grad():
        h = draft.step(torch.tensor([x[1:]]), draft.fc(aux), torch.arange(L)[None], attend(True))[
            :, -1:
        ]
        logits = [draft.logits(h)[0, -1]]
        for j, token in enumerate(chain, 1):
            h = draft.step(torch.tensor([[token]]), h, torch.tensor([[L - 1 + j]]), attend(False))
            logits.append(draft.logits(h)[0, -1])
    return torch.stack(logits)


def with_logits(draft: Eagle3Draft, propose):
    """(propose(), the draft's logits [K, V_draft] at each of its steps, recorded as computed)."""
    seen = []

    def logits(h):
        out = Eagle3Draft.logits(draft, h)
        seen.append(out[0, -1].float())
        return out

    draft.logits = logits  # shadows the method on this instance only
    try:
        got = propose()
    finally:
        del draft.logits
    return got, torch.stack(seen)


def test_proposer_matches_dense_training_semantics(target, drafts):
    """Drive the proposer through several verify rounds by hand (speculative cache entries dropped,
    accepted positions re-fed from target features) and check its proposals against the dense
    reference."""
    draft, k = drafts[1], 4
    rng = random.Random(3)
    x = [rng.randrange(len(WORDS)) for _ in range(23)]  # x[0..L], L = 22
    L = len(x) - 1
    aux = aux_from_scratch(target, x[:L])
    proposer = Eagle3Proposer(draft)
    proposer.reset()
    cuts = [0, 9, 10, 14, L]
    for a, b in zip(cuts, cuts[1:]):
        proposer.extend(x[a + 1 : b + 1], aux[:, a:b])
        got, logits = with_logits(draft, lambda: proposer.propose(k, 0.0, None))
    assert len(proposer.cache) == L + k - 1
    ref = dense_chain_logits(draft, aux, x, got.tokens[:-1])
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    greedy = [int(r.argmax()) for r in ref]
    assert got.tokens == [d + int(draft.d2t[d]) for d in greedy]


class CheckedProposer(Eagle3Proposer):
    """An Eagle3Proposer that, at every proposal inside generate_speculative, recomputes the dense
    reference from the tokens so far and the target's aux states computed without a cache: checks
    the decoding loop's wiring (which aux rows, which tokens, cache crops on both sides)."""

    def __init__(self, draft, target, first_token):
        super().__init__(draft)
        self.target, self.first_token, self.checked = target, first_token, 0

    def reset(self):
        super().reset()
        self.seq = [self.first_token]

    def extend(self, next_tokens, aux_hidden):
        self.seq += list(next_tokens)
        super().extend(next_tokens, aux_hidden)

    def propose(self, k, temperature, generator):
        parent = super().propose
        got, logits = with_logits(self.draft, lambda: parent(k, temperature, generator))
        aux = aux_from_scratch(self.target, self.seq[:-1])
        ref = dense_chain_logits(self.draft, aux, self.seq, got.tokens[:-1])
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        self.checked += 1
        return got


def test_decoding_loop_feeds_the_draft_target_features(target, drafts):
    rng = random.Random(4)
    stats = AcceptanceStats(3)
    checked = 0
    for temperature in (0.0, 1.0):
        for _ in range(3):
            ids = prompt_ids(target, rng)
            proposer = CheckedProposer(drafts[0], target, ids[0])
            generate_speculative(
                target,
                proposer,
                ids,
                3,
                temperature,
                14,
                set(),
                torch.Generator().manual_seed(0),
                stats,
            )
            checked += proposer.checked
    # Rounds with accepted drafts were re-fed too.
    assert checked >= 10 and stats.num_accepted_tokens > 0


# --- a prompt set ------------------------------------------------------------------------------


def test_evaluate_multi_turn(target, drafts):
    rng = random.Random(5)
    prompts = [[random_prompt(rng, 4), random_prompt(rng, 3)] for _ in range(3)]
    res = evaluate(
        target,
        drafts[0],
        prompts,
        k=2,
        temperature=0.0,
        max_new_tokens=12,
        progress=False,
        keep_outputs=True,
    )
    assert res["greedy_mismatched_turns"] == 0 and res["num_turns"] == 6
    assert res["acceptance_length"] == 1 + res["num_accepted_tokens"] / res["num_drafts"]
    assert res["speculative"]["generated_tokens"] == res["baseline"]["generated_tokens"] > 0
    assert res["speedup"] is not None and len(res["acceptance_rate_per_position"]) == 2
    # The draft's 12 tokens leave 4 of the 16 out: each generated one is counted as such.
    vocab = set(drafts[0].draft_ids.tolist())
    per = [sum(t not in vocab for turn in p["outputs"] for t in turn) for p in res["per_prompt"]]
    assert [p["outside_draft_vocab"] for p in res["per_prompt"]] == per
    total = res["speculative"]["generated_tokens"]
    assert res["outside_draft_vocab_share"] == pytest.approx(sum(per) / total)
