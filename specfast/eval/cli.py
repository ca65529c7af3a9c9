"""The `specfast eval` subcommand: `register(subparsers)` adds it to the specfast CLI."""
from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("specfast")


def cmd_eval(a) -> int:
    import torch

    from specfast.targets import load_target

    from .evaluate import evaluate, write_report
    from .load import build_draft, read_draft
    from .prompts import read_prompts

    prompts = read_prompts(a.prompts, limit=a.limit)  # bad prompt files fail before any model loads
    if a.threads is not None:
        if a.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, not {a.threads}")
        torch.set_num_threads(a.threads)
    tensors, cfg = read_draft(a.draft)
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # The target hands out the aux layers the draft was trained on.
    target = load_target(a.target, device=device, aux_layer_ids=cfg.aux_layer_ids)
    draft = build_draft(tensors, cfg, target, a.draft)
    log.info("eval: %d prompt(s), K=%d, temperature %g, max %d new tokens per turn",
             len(prompts), a.num_spec_tokens, a.temperature, a.max_new_tokens)
    results = evaluate(target, draft, prompts, a.num_spec_tokens, a.temperature, a.max_new_tokens,
                       baseline=not a.no_baseline, seed=a.seed, progress=not a.no_progress)
    results = {"draft": a.draft, "prompts": a.prompts, **results}
    if a.out:
        json_path, png_path = write_report(results, a.out)
        log.info("wrote %s and %s", json_path, png_path)
    summary = {k: v for k, v in results.items() if k != "per_prompt"}
    print(json.dumps(summary, indent=None if a.out else 2))
    sys.stdout.flush()
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "eval", help="acceptance length of a draft by real speculative decoding with the target",
        description="Chain speculative decoding (batch 1, Hugging Face target with its KV cache) of every prompt: "
                    "the draft proposes K tokens, the target verifies them in one forward (greedy at temperature 0, "
                    "lossless rejection sampling above). Reports vLLM's mean acceptance length τ = 1 + accepted / "
                    "drafts, acceptance by draft position, and tokens/s against the target alone.")
    s.add_argument("--target", default="smollm2", help="target model folder or embedded name (default: smollm2)")
    s.add_argument("--draft", required=True,
                   help="export folder (config.json + model.safetensors), checkpoint folder, or training run folder")
    s.add_argument("--prompts", required=True,
                   help="JSONL of {\"turns\": [...]} or chat records (messages / conversations), e.g. a prepared "
                        "dataset's heldout.jsonl; user turns are answered in order")
    s.add_argument("--num-spec-tokens", "-k", type=int, default=3, help="draft tokens per verification (default 3)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--max-new-tokens", type=int, default=256, help="max tokens per answered turn (default 256)")
    s.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    s.add_argument("--out", help="results JSON (a PNG of acceptance by position is written beside it)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy machine)")
    s.add_argument("--no-baseline", action="store_true", help="skip the target-alone run (no speedup reported)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)
