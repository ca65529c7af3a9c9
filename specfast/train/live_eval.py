"""Acceptance measured while training: real speculative decoding of a few held-out prompts at
checkpoints, through the same code as `specfast eval` (the draft's weights are read into a fresh
inference draft with `draft_from_weights`, then `evaluate` decodes greedily with the target), and
the best draft so far kept in RUN/best/.

    RUN/best/draft.safetensors   the draft with the highest τ so far (a checkpoint-style draft
                                 file: `specfast export RUN/best` and `specfast eval --draft
                                 RUN/best` take it as they take a checkpoint)
    RUN/best/best.json           {"step", "tau", "k", "num_prompts"}

The simulated τ of the training metrics assumes the teacher's tokens at every position; this one
is what a server would see on these prompts, up to the prompt count. Evaluating does not touch the
global RNG, the draft's mode or its gradients, so a run with evals trains exactly as one without.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from specfast.eval.evaluate import evaluate
from specfast.eval.prompts import read_prompts
from specfast.fileio import atomic_dir
from specfast.model.checkpoint_files import save_draft_weights
from specfast.model.load import draft_from_weights
from specfast.targets.base import TargetModel

log = logging.getLogger("specfast")

BEST_DIR = "best"
BEST_FILE = "best.json"


def can_decode(target) -> bool:
    """Whether `target` runs its decoder layers (an offline run's heads-only target does not)."""
    return type(target).forward_cached is not TargetModel.forward_cached


def _weights(draft) -> dict:
    """The draft's trainable tensors as plain fp32 CPU copies."""
    out = {}
    for k, v in draft.trainable_state_dict().items():
        v = v.detach().to("cpu")
        out[k] = v.float().clone() if v.is_floating_point() else v.clone()
    return out


class LiveEval:
    """τ at K of a training draft on the first `limit` prompts of `prompts_path` (greedy)."""

    def __init__(
        self,
        target,
        prompts_path: str | Path,
        k: int = 3,
        limit: int = 8,
        max_new_tokens: int = 128,
    ):
        if not can_decode(target):
            raise ValueError(
                f"in-training eval needs a target that decodes, not a {type(target).__name__}"
            )
        if k < 1 or limit < 1 or max_new_tokens < 1:
            raise ValueError(
                f"eval needs k, limit, max_new_tokens ≥ 1 (got {k}, {limit}, {max_new_tokens})"
            )
        self.target, self.k, self.max_new_tokens = target, k, max_new_tokens
        self.prompts = read_prompts(prompts_path, limit=limit)  # a bad file fails before training

    @classmethod
    def for_training(cls, cfg, target) -> "LiveEval":
        """From a TrainConfig (eval_prompts, eval_k, eval_limit, eval_max_new_tokens). The training
        target is reused when it decodes (online runs); offline runs load the whole target."""
        if not can_decode(target):
            from specfast.targets import load_target

            target = load_target(
                cfg.target, device=str(target.device), aux_layer_ids=list(target.aux_layer_ids)
            )
        return cls(target, cfg.eval_prompts, cfg.eval_k, cfg.eval_limit, cfg.eval_max_new_tokens)

    def __call__(self, draft, step: int) -> dict:
        """Decode the prompts with (a copy of) `draft`, a whole (unsharded) draft; returns the
        metrics to log for `step`."""
        tensors, cfg = _weights(draft), draft.config
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the draft copy's constructor draws an init
            copy = draft_from_weights(tensors, cfg, self.target, f"step {step}")
            with torch.no_grad():
                res = evaluate(
                    self.target,
                    copy,
                    self.prompts,
                    self.k,
                    0.0,
                    self.max_new_tokens,
                    baseline=False,
                    progress=False,
                )
        record = {
            "eval_tau": res["acceptance_length"],
            "eval_k": self.k,
            "eval_acceptance_rate": res["acceptance_rate_per_position"],
            "eval_num_drafts": res["num_drafts"],
            "eval_num_prompts": len(self.prompts),
            "eval_seconds": round(time.perf_counter() - t0, 2),
        }
        log.info(
            "step %d: τ %.3f at K=%d on %d held-out prompts (%.0f s)",
            step,
            record["eval_tau"],
            self.k,
            len(self.prompts),
            record["eval_seconds"],
        )
        return record


class BestCheckpoint:
    """RUN/best/: the draft with the highest in-training τ so far (ties keep the earlier one)."""

    def __init__(self, out: str | Path):
        self.dir = Path(out) / BEST_DIR
        self.best: dict | None = None
        if (self.dir / BEST_FILE).is_file():  # a resumed run keeps the best of its earlier part
            self.best = json.loads((self.dir / BEST_FILE).read_text())

    @property
    def tau(self) -> float | None:
        return None if self.best is None else self.best["tau"]

    def update(self, draft, step: int, record: dict) -> bool:
        """Keep `draft` if `record["eval_tau"]` beats the best so far; returns whether it did."""
        tau = record["eval_tau"]
        if self.best is not None and tau <= self.best["tau"]:
            return False
        self.best = {
            "step": step,
            "tau": tau,
            "k": record.get("eval_k"),
            "num_prompts": record.get("eval_num_prompts"),
        }
        with atomic_dir(self.dir) as tmp:
            save_draft_weights(draft, tmp)
            (tmp / BEST_FILE).write_text(json.dumps(self.best, indent=2))
        log.info("step %d: best τ so far (%.3f), kept in %s", step, tau, self.dir)
        return True


def best_checkpoint(run: str | Path) -> Path:
    """RUN/best, for `export` / `eval` given a run folder and asked for its best draft."""
    path = Path(run) / BEST_DIR
    if not (path / BEST_FILE).is_file():
        raise FileNotFoundError(
            f"{run}: no best draft (train with --eval-every N --eval-prompts FILE to keep one)"
        )
    return path
