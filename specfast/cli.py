"""The `specfast` command line: the parser is built from the subcommand table in
`specfast.commands`.

Error policy: bad input (ValueError and the file errors in USER_ERRORS) is one line,
`specfast CMD: error: ...`, and exit status 2; `-v` shows the traceback. Anything else is a bug and
shows its traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from specfast.commands import COMMANDS

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError)


def _quiet_libraries() -> None:
    """Library log chatter below errors stays out of an ordinary run. Python warnings are not
    filtered: the commands raise none today (the one they did, transformers' `past_key_values`
    deprecation, is avoided where the target is called), and a new one should be seen."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for noisy in ("transformers", "torch", "accelerate", "safetensors"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="specfast: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        _quiet_libraries()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specfast",
        description="Train EAGLE-3 speculative-decoding draft models: prepare chat data, train "
        "with the target in the loop, export a checkpoint vLLM and SGLang load "
        "unchanged.",
        epilog="Run `specfast demo --out demo-out` for the whole path on the embedded SmolLM2 "
        "target.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        s = sub.add_parser(c.name, help=c.help, description=c.description)
        c.add_arguments(s)
        s.set_defaults(func=c.run)
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
        print(f"specfast {a.command}: error: {_rank_prefix()}{e}", file=sys.stderr)
        return 2


def _rank_prefix() -> str:
    """`[rank r] ` under torchrun with several ranks (every rank reports its own errors)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""
