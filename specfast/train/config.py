"""TrainConfig: every knob of `specfast train`, from defaults, a YAML file, then command-line
flags."""

from __future__ import annotations

import argparse
import ast
import io
import tokenize
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml


@dataclass
class TrainConfig:
    data: str = (
        ""  # a prepared dataset folder (specfast prepare) or a shard folder (specfast capture)
    )
    target: str = "smollm2"  # a local Hugging Face folder, or an embedded name
    out: str = "runs/draft"  # the run folder: checkpoints, metrics, plots, summary
    ttt_steps: int = 7  # draft steps unrolled per position (training-time test)
    batch_tokens: int = 2048  # token budget of one packed row (longer samples are cut to it)
    # Train on the first N samples of the data (those with a supervised token); 0 = all. With
    # target_cache_gb, a small N gives more epochs, each after the first without the target.
    max_samples: int = 0
    # Online: keep the target's outputs per sample in host memory, up to this many GiB, so later
    # epochs skip the target forward (~4.6 KiB a token for a 576-wide target in bf16); 0 = off
    target_cache_gb: float = 0.0
    grad_accum: int = 1  # packed rows per optimizer step (per rank)
    max_steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # stop (and save) after this much training time; 0 = no limit
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the decay ends at this share of lr
    lr_schedule: str = "fraction"  # fraction: warmup a share of the budget | steps: the old shape
    warmup: float = 0.05  # lr_schedule fraction: share of the budget (steps or minutes) warming up
    warmup_steps: int = 50  # lr_schedule steps: warmup length in steps
    weight_decay: float = 0.0  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 0.5  # clip the global gradient norm to this
    seed: int = 0  # draft init and the data order
    save_every: int = 200  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Matmul precision of the draft and the frozen target: bf16 (weights, optimizer and sums stay
    # fp32; ~1.5x faster on CPUs with AVX-512 BF16 or AMX) | fp32 | auto (bf16 on CUDA, fp32 on CPU)
    precision: str = "auto"
    # Under torchrun: ddp (every rank holds the draft) or fsdp2 (draft and optimizer sharded).
    parallel: str = "ddp"
    shard_target: bool = False  # fsdp2, online: shard the frozen target's layers over the ranks
    # Recompute each TTT step's layer in backward: stores a step's inputs, not its activations.
    recompute: bool = False
    # Pad each row to a multiple of N tokens and compute every row at every TTT step: static
    # shapes for torch.compile / CUDA graphs (more work than skipping rows); 0 = off.
    static_bucket: int = 0
    init_from_target: bool = False  # lm_head from the target's rows; norm scaled to unit logits
    # A published EAGLE-3 draft to continue (export folder: vLLM/SGLang, SpecForge or speculators
    # layout; or a checkpoint / run folder); its lm_head follows the data's draft vocabulary.
    init_from: str = ""
    fc_init: str = "aux_rms"  # aux_rms: scaled to the first batch's aux states | normal: std 0.02
    fc_init_rms: float = 0.5  # fc_init aux_rms: RMS of fc(aux) at the start
    # The teacher's logits are divided by it before its softmax: below 1 the target's distribution
    # is sharpened toward its own pick, which greedy decoding accepts
    teacher_temperature: float = 1.0
    eval_every: int = 0  # real speculative decoding on --eval-prompts every N steps; 0 = never
    # Held-out prompts for eval_every, e.g. a prepared folder's heldout.jsonl.
    eval_prompts: str = ""
    eval_limit: int = 8  # prompts used by each in-training eval
    eval_k: int = 3  # draft tokens per verification in the in-training eval
    eval_max_new_tokens: int = 128  # per answered turn, in the in-training eval
    aux_layer_ids: str = ""  # comma-separated 0-based layer outputs; empty = EAGLE-3 default
    tensorboard: bool = True  # also write RUN/tensorboard/
    progress: bool = True  # a progress bar on stderr

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"config: {msg}")

        need(self.data, "data is required (a `specfast prepare` output folder)")
        need(self.ttt_steps >= 1, f"ttt_steps must be ≥ 1, not {self.ttt_steps}")
        need(self.batch_tokens >= 16, f"batch_tokens must be ≥ 16, not {self.batch_tokens}")
        need(self.max_samples >= 0, f"max_samples must be ≥ 0, not {self.max_samples}")
        need(self.target_cache_gb >= 0, f"target_cache_gb must be ≥ 0, not {self.target_cache_gb}")
        need(self.static_bucket >= 0, f"static_bucket must be ≥ 0, not {self.static_bucket}")
        need(self.grad_accum >= 1, f"grad_accum must be ≥ 1, not {self.grad_accum}")
        need(self.max_steps >= 1, f"max_steps must be ≥ 1, not {self.max_steps}")
        need(self.lr > 0, f"lr must be > 0, not {self.lr}")
        need(
            0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}"
        )
        need(self.warmup_steps >= 0, "warmup_steps must be ≥ 0")
        need(
            self.lr_schedule in ("fraction", "steps"),
            f"lr_schedule must be fraction or steps, not {self.lr_schedule!r}",
        )
        need(0 <= self.warmup < 1, f"warmup must be a fraction in [0, 1), not {self.warmup}")
        need(
            self.fc_init in ("aux_rms", "normal"),
            f"fc_init must be aux_rms or normal, not {self.fc_init!r}",
        )
        need(self.fc_init_rms > 0, f"fc_init_rms must be > 0, not {self.fc_init_rms}")
        need(
            self.teacher_temperature > 0,
            f"teacher_temperature must be > 0, not {self.teacher_temperature}",
        )
        need(self.eval_every >= 0, f"eval_every must be ≥ 0, not {self.eval_every}")
        need(
            not self.eval_every or self.eval_prompts,
            "eval_every needs eval_prompts (a JSONL of held-out prompts)",
        )
        need(self.eval_limit >= 1, f"eval_limit must be ≥ 1, not {self.eval_limit}")
        need(self.eval_k >= 1, f"eval_k must be ≥ 1, not {self.eval_k}")
        need(self.eval_max_new_tokens >= 1, "eval_max_new_tokens must be ≥ 1")
        need(self.save_every >= 1, "save_every must be ≥ 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints must be ≥ 1")
        need(
            self.precision in ("auto", "bf16", "fp32"),
            f"precision must be auto, bf16 or fp32, not {self.precision!r}",
        )
        need(
            self.parallel in ("ddp", "fsdp2"),
            f"parallel must be ddp or fsdp2, not {self.parallel!r}",
        )
        need(
            not self.shard_target or self.parallel == "fsdp2",
            "shard_target needs parallel fsdp2",
        )
        self.parsed_aux_layer_ids()

    def parsed_aux_layer_ids(self) -> list[int] | None:
        if not self.aux_layer_ids:
            return None
        try:
            ids = [int(x) for x in str(self.aux_layer_ids).split(",")]
        except ValueError:
            raise ValueError(
                f"config: aux_layer_ids {self.aux_layer_ids!r} is not a comma-separated list "
                "of ints"
            ) from None
        if len(ids) != 3:
            raise ValueError(f"config: aux_layer_ids needs 3 ids, got {ids}")
        return ids

    def to_dict(self) -> dict:
        return asdict(self)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    known = {f.name for f in fields(TrainConfig)}
    for key in d:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    return d


def field_help() -> dict[str, str]:
    """Each TrainConfig field's comments in this file (the lines just above it and the ones on
    it): the flags' help, so that it cannot drift from the code."""
    source = Path(__file__).read_text()
    comments, whole_line = {}, set()
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.COMMENT:
            comments[t.start[0]] = t.string.lstrip("# ").strip()
            if t.line.lstrip().startswith("#"):
                whole_line.add(t.start[0])
    cls = next(
        n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig"
    )
    out = {}
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line in whole_line:
            above.insert(0, comments[line])
            line -= 1
        on = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        out[node.target.id] = " ".join(above + on)
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (`--batch-tokens`, `--no-tensorboard`); unset flags leave YAML values
    alone."""
    helps = field_help()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{helps.get(f.name, '')} (default: {default})".lstrip(),
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=type(default),
                default=None,
                metavar=f.name.upper(),
                help=f"{helps.get(f.name, '')} (default: {default!r})".lstrip(),
            )


def build_config(args: argparse.Namespace, config_path: str | None) -> TrainConfig:
    values = load_yaml(config_path) if config_path else {}
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"config: {e}") from None
    for f in fields(TrainConfig):  # YAML may give an int where a float is wanted, etc.
        v = getattr(cfg, f.name)
        if f.type in ("float",) and isinstance(v, int) and not isinstance(v, bool):
            setattr(cfg, f.name, float(v))
        elif f.type in ("int", "float", "bool", "str") and not isinstance(
            v, {"int": int, "float": float, "bool": bool, "str": str}[f.type]
        ):
            raise ValueError(f"config: {f.name} must be {f.type}, got {v!r}")
    cfg.validate()
    return cfg
