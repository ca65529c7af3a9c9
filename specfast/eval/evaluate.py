"""`evaluate`: acceptance length by real speculative decoding over a prompt set, against the target
alone for the timing baseline; and the report (JSON + a PNG of acceptance by draft position)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from specfast.data.chat import encode_prompt
from specfast.device import resolve_device
from specfast.fileio import atomic_path, atomic_write_json
from specfast.model.draft import Eagle3Draft
from specfast.model.load import check_matches_target, draft_from_weights, read_draft

from .decode import generate_plain, generate_speculative
from .prompts import Prompt
from .proposer import Eagle3Proposer
from .stats import AcceptanceStats

log = logging.getLogger("specfast")


def load_for_eval(draft_path: str | Path, target_name: str, device: str | torch.device = "cpu"):
    """(target, draft): the target with the aux layers the draft was trained on, and the draft
    beside it (specfast.model.load)."""
    from specfast.targets import load_target

    tensors, cfg = read_draft(draft_path)
    target = load_target(
        target_name, device=resolve_device(device), aux_layer_ids=cfg.aux_layer_ids
    )
    return target, draft_from_weights(tensors, cfg, target, str(draft_path))


def _as_prompts(prompts) -> list[Prompt]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Prompt):
            out.append(p)
        elif isinstance(p, str):
            out.append(Prompt(turns=[p], where=f"prompt {i}"))
        elif isinstance(p, (list, tuple)) and p and all(isinstance(t, (str, list)) for t in p):
            out.append(Prompt(turns=list(p), where=f"prompt {i}"))
        else:
            raise ValueError(f"prompt {i}: expected a Prompt, a string or a list of user turns")
    if not out:
        raise ValueError("no prompts to evaluate")
    return out


def _run_conversation(
    target, prompt: Prompt, generate_turn, eos: set[int]
) -> tuple[list[list[int]], float]:
    """Answer the user turns in order, each answer kept in the context (every turn prefills the
    whole conversation afresh, on both sides alike). Returns (per-turn outputs, seconds spent
    generating: prefill + decoding, not tokenisation)."""
    tok = target.tokenizer
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    outputs, seconds, media = [], 0.0, []
    for i, turn in enumerate(prompt.turns):
        messages.append({"role": "user", "content": turn})
        media += prompt.media[i] if i < len(prompt.media) else []
        ids = encode_turn(target, messages, media, prompt.where)
        t0 = time.perf_counter()
        out = generate_turn(ids, media) if media else generate_turn(ids)
        seconds += time.perf_counter() - t0
        outputs.append(out)
        answer = tok.decode([t for t in out if t not in eos], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
    return outputs, seconds


def encode_turn(target, messages: list[dict], media: list, where: str) -> list[int]:
    """Prompt token ids of a conversation so far: a multimodal target's own processor (media
    placeholders expanded), else the tokenizer's chat template (text parts joined)."""
    if hasattr(target, "encode_prompt"):
        return target.encode_prompt(messages, media, where)
    if media:
        raise ValueError(f"{where}: images or audio in a prompt, but the target reads text only")
    from specfast.data.media import flatten_text

    return encode_prompt(target.tokenizer, flatten_text(messages), where)


def _speed(tokens: int, seconds: float) -> dict:
    return {
        "generated_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
    }


def evaluate(
    target,
    draft,
    prompts,
    k: int = 3,
    temperature: float = 0.0,
    max_new_tokens: int = 256,
    *,
    baseline: bool = True,
    seed: int = 0,
    progress: bool = True,
    keep_outputs: bool = False,
) -> dict:
    """Speculative decoding of every prompt with `draft` proposing `k` tokens per step, verified by
    `target` (a TargetModel that decodes).

    draft: an Eagle3Draft with the target's embeddings attached (specfast.model.load.load_draft),
           or any proposer with reset() / extend(next_tokens, aux_hidden) /
           propose(k, temperature, generator).
    prompts: Prompt objects (specfast.eval.prompts.read_prompts), strings, or lists of user turns.
    baseline: also run the target alone on the same prompts, for tokens/s and the speedup (and,
              greedy, to check the speculative output is identical).
    Returns a dict: vLLM-style acceptance counters, τ, acceptance rate by position, speeds, speedup;
    for an Eagle3Draft also how many generated tokens lie outside its vocabulary (no proposal can
    ever match one of those; a larger --draft-vocab-size leaves fewer).
    """
    if k < 1:
        raise ValueError(f"--num-spec-tokens must be ≥ 1, not {k}")
    if temperature < 0:
        raise ValueError(f"--temperature must be ≥ 0, not {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be ≥ 1, not {max_new_tokens}")
    prompts = _as_prompts(prompts)
    outside = None  # bool over the target vocabulary: the tokens no proposal can be
    if isinstance(draft, Eagle3Draft):
        check_matches_target(draft.config, target, "draft")
        proposer = Eagle3Proposer(draft)
        outside = ~draft.t2d.cpu()
    else:
        proposer = draft
    eos = target.eos_token_ids()
    if not eos:
        log.warning("the tokenizer names no EOS token: every turn runs to --max-new-tokens")
    gen_base = torch.Generator().manual_seed(seed)
    gen_spec = torch.Generator().manual_seed(seed + 1)

    def plain(ids, media=None):
        return generate_plain(target, ids, temperature, max_new_tokens, eos, gen_base, media)

    def speculative(stats):
        return lambda ids, media=None: generate_speculative(
            target, proposer, ids, k, temperature, max_new_tokens, eos, gen_spec, stats, media
        )

    # Warm-up (untimed): the first forwards pay one-off allocation and dispatch costs.
    first = prompts[0]
    warm_media = first.media[0] if first.media else []
    warm_ids = encode_turn(
        target, [{"role": "user", "content": first.turns[0]}], warm_media, first.where
    )
    generate_plain(
        target, warm_ids, temperature, 2, eos, torch.Generator().manual_seed(seed), warm_media
    )
    generate_speculative(
        target,
        proposer,
        warm_ids,
        k,
        temperature,
        k + 2,
        eos,
        torch.Generator().manual_seed(seed),
        AcceptanceStats(k),
        warm_media,
    )

    total = AcceptanceStats(k)
    spec_tokens = spec_seconds = base_tokens = base_seconds = outside_tokens = 0
    mismatched_turns, num_turns, per_prompt = 0, 0, []
    for prompt in tqdm(prompts, desc="eval", unit="prompt", disable=not progress, mininterval=1.0):
        stats = AcceptanceStats(k)
        spec_out, secs = _run_conversation(target, prompt, speculative(stats), eos)
        spec_seconds += secs
        spec_tokens += sum(map(len, spec_out))
        total.merge(stats)
        num_turns += len(prompt.turns)
        entry = {
            "where": prompt.where,
            "turns": len(prompt.turns),
            "generated_tokens": sum(map(len, spec_out)),
            "num_drafts": stats.num_drafts,
            "acceptance_length": stats.acceptance_length,
        }
        if outside is not None:
            generated = torch.tensor([t for turn in spec_out for t in turn], dtype=torch.long)
            n = int(outside[generated].sum())
            outside_tokens += n
            entry["outside_draft_vocab"] = n
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
        log.warning(
            "%d turn(s) differ between greedy speculative decoding and the target alone",
            mismatched_turns,
        )

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
        "outside_draft_vocab_share": (
            outside_tokens / max(spec_tokens, 1) if outside is not None else None
        ),
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
    ax.set_title(
        f"acceptance by position — τ = {results['acceptance_length']:.2f} "
        f"(K={results['num_spec_tokens']}, T={results['temperature']})",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no .png suffix to infer it from
    plt.close(fig)
    return path


def write_report(results: dict, out: str | Path) -> tuple[Path, Path]:
    """results.json and, beside it, results.png."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    return out, plot_acceptance(results, out.with_suffix(".png"))
