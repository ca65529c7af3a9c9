"""`evaluate`: acceptance length by real speculative decoding over a prompt set, against the target
alone for the timing baseline; and the report (JSON + a PNG of acceptance by draft position)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from specfast.model.draft import Eagle3Draft

from .decode import generate_plain, generate_speculative
from .load import check_matches_target
from .prompts import Prompt
from .proposer import Eagle3Proposer
from .stats import AcceptanceStats

log = logging.getLogger("specfast")


def eos_ids_of(target) -> set[int]:
    """The tokenizer's EOS and the generation config's eos_token_id(s)."""
    ids = set()
    tok_eos = getattr(target.tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    gen_cfg = getattr(target.model, "generation_config", None)
    gen_eos = getattr(gen_cfg, "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return ids


def encode_chat(tokenizer, messages: list[dict], where: str) -> list[int]:
    """The chat template with the generation prompt, tokenised without extra special tokens."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template error is a data/tokenizer problem: say where
        raise ValueError(f"{where}: chat template failed ({e})") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{where}: the chat template produced no tokens")
    return list(ids)


def _as_prompts(prompts) -> list[Prompt]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            out.append(p)
        elif isinstance(p, str):
            out.append(Prompt(turns=[p], where=f"prompt {i}"))
        elif isinstance(p, (list, tuple)) and p and all(isinstance(t, str) for t in p):
            out.append(Prompt(turns=list(p), where=f"prompt {i}"))
        else:
            raise ValueError(f"prompt {i}: expected a Prompt, a string or a list of user turns")
    if not out:
        raise ValueError("no prompts to evaluate")
    return out


def _run_conversation(target, prompt: Prompt, generate_turn, eos: set[int]) -> tuple[list[list[int]], float]:
    """Answer the user turns in order, each answer kept in the context (every turn prefills the whole
    conversation afresh, on both sides alike). Returns (per-turn outputs, seconds spent generating:
    prefill + decoding, not tokenisation)."""
    tok = target.tokenizer
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    outputs, seconds = [], 0.0
    for turn in prompt.turns:
        messages.append({"role": "user", "content": turn})
        ids = encode_chat(tok, messages, prompt.where)
        t0 = time.perf_counter()
        out = generate_turn(ids)
        seconds += time.perf_counter() - t0
        outputs.append(out)
        answer = tok.decode([t for t in out if t not in eos], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
    return outputs, seconds


def _speed(tokens: int, seconds: float) -> dict:
    return {"generated_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": tokens / seconds if seconds > 0 else None}


def evaluate(target, draft, prompts, k: int = 3, temperature: float = 0.0, max_new_tokens: int = 256, *,
             baseline: bool = True, seed: int = 0, progress: bool = True, keep_outputs: bool = False) -> dict:
    """Speculative decoding of every prompt with `draft` proposing `k` tokens per step, verified by
    `target` (an HFTarget: .model, .tokenizer, .aux_layer_ids, .embed_weight()).

    draft: an Eagle3Draft with the target's embeddings attached (specfast.eval.load.load_draft), or any
           proposer with reset() / extend(next_tokens, aux_hidden) / propose(k, temperature, generator).
    prompts: Prompt objects (specfast.eval.prompts.read_prompts), strings, or lists of user turns.
    baseline: also run the target alone on the same prompts, for tokens/s and the speedup (and, greedy,
              to check the speculative output is identical).
    Returns a dict: vLLM-style acceptance counters, τ, acceptance rate by position, speeds, speedup.
    """
    if k < 1:
        raise ValueError(f"--num-spec-tokens must be ≥ 1, not {k}")
    if temperature < 0:
        raise ValueError(f"--temperature must be ≥ 0, not {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, not {max_new_tokens}")
    prompts = _as_prompts(prompts)
    if isinstance(draft, Eagle3Draft):
        check_matches_target(draft.config, target, "draft")
        proposer = Eagle3Proposer(draft)
    else:
        proposer = draft
    model, aux_ids, eos = target.model, list(target.aux_layer_ids), eos_ids_of(target)
    if not eos:
        log.warning("the tokenizer names no EOS token: every turn runs to --max-new-tokens")
    gen_base = torch.Generator().manual_seed(seed)
    gen_spec = torch.Generator().manual_seed(seed + 1)

    def plain(ids):
        return generate_plain(model, ids, temperature, max_new_tokens, eos, gen_base)

    def speculative(stats):
        return lambda ids: generate_speculative(model, aux_ids, proposer, ids, k, temperature, max_new_tokens,
                                                eos, gen_spec, stats)

    # Warm-up (untimed): the first forwards pay one-off allocation and dispatch costs.
    warm_ids = encode_chat(target.tokenizer, [{"role": "user", "content": prompts[0].turns[0]}], prompts[0].where)
    generate_plain(model, warm_ids, temperature, 2, eos, torch.Generator().manual_seed(seed))
    generate_speculative(model, aux_ids, proposer, warm_ids, k, temperature, k + 2, eos,
                         torch.Generator().manual_seed(seed), AcceptanceStats(k))

    total = AcceptanceStats(k)
    spec_tokens = spec_seconds = base_tokens = base_seconds = 0
    mismatched_turns, num_turns, per_prompt = 0, 0, []
    for prompt in tqdm(prompts, desc="eval", unit="prompt", disable=not progress, mininterval=1.0):
        stats = AcceptanceStats(k)
        spec_out, secs = _run_conversation(target, prompt, speculative(stats), eos)
        spec_seconds += secs
        spec_tokens += sum(map(len, spec_out))
        total.merge(stats)
        num_turns += len(prompt.turns)
        entry = {"where": prompt.where, "turns": len(prompt.turns), "generated_tokens": sum(map(len, spec_out)),
                 "num_drafts": stats.num_drafts, "acceptance_length": stats.acceptance_length}
        if baseline:
            base_out, secs = _run_conversation(target, prompt, plain, eos)
            base_seconds += secs
            base_tokens += sum(map(len, base_out))
            if temperature == 0:
                # Greedy speculative decoding is exact; a difference can only come from near-tied
                # logits computed in a different batch shape (bf16 on GPU), or from a bug.
                bad = sum(a != b for a, b in zip(spec_out, base_out))
                mismatched_turns += bad
                entry["greedy_mismatched_turns"] = bad
        if keep_outputs:
            entry["outputs"] = spec_out
            if baseline:
                entry["baseline_outputs"] = base_out
        per_prompt.append(entry)
    if mismatched_turns:
        log.warning("%d turn(s) differ between greedy speculative decoding and the target alone", mismatched_turns)

    spec = _speed(spec_tokens, spec_seconds)
    base = _speed(base_tokens, base_seconds) if baseline else None
    speedup = None
    if base and base["tokens_per_s"] and spec["tokens_per_s"]:
        speedup = spec["tokens_per_s"] / base["tokens_per_s"]
    return {
        "target": getattr(target, "name", None),
        "num_prompts": len(prompts),
        "num_turns": num_turns,
        "num_spec_tokens": k,
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        **total.to_dict(),
        "speculative": spec,
        "baseline": base,
        "speedup": speedup,
        "greedy_mismatched_turns": mismatched_turns if (baseline and temperature == 0) else None,
        "per_prompt": per_prompt,
    }


def plot_acceptance(results: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = results["acceptance_rate_per_position"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    xs = list(range(1, len(rates) + 1))
    ax.bar(xs, rates, color="#4c72b0")
    for x, r in zip(xs, rates):
        ax.text(x, r + 0.01, f"{r:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / verification steps")
    ax.set_title(f"acceptance by position — τ = {results['acceptance_length']:.2f} "
                 f"(K={results['num_spec_tokens']}, T={results['temperature']})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: dict, out: str | Path) -> tuple[Path, Path]:
    """results.json and, beside it, results.png."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    return out, plot_acceptance(results, out.with_suffix(".png"))
