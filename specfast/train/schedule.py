"""Learning rate: a linear warmup, then a cosine decay to min_ratio·lr, over the run's budget.

The budget is max_steps, or with a time box (max_seconds > 0) whichever of steps and seconds runs
out first; progress p = max(steps / max_steps, seconds / max_seconds) goes 0 → 1.

    "fraction" (default)  warmup for the first `warmup` share of the budget (0.05: 5% of the steps,
                          or of the minutes), lr rising linearly to the peak; then the cosine runs
                          from the peak at the end of warmup to min_ratio·lr at p = 1. The shape is
                          the same whatever the budget, and the decay starts where warmup ends.
    "steps" (legacy)      warmup over a fixed `warmup_steps`, then cosine over p measured from
                          step 0 (time-boxed) or from the end of warmup (step-boxed). Time-boxed
                          with few steps this warms up for most of the run and then drops at once
                          (50 warmup steps of ~76: from the peak to a third of it in one step).

`factor(step, seconds)` is the multiplier for 0-based optimizer step `step`, where `seconds` is the
training time spent before this step. Warmup counts the step being made (step + 1 of max_steps), so
the first update already has a small non-zero rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("fraction", "steps")


def lr_factor(step: int, warmup: int, progress: float, min_ratio: float) -> float:
    """The legacy shape: multiplier of the peak lr for 0-based optimizer step `step`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return _cosine(progress, min_ratio)


def _cosine(p: float, min_ratio: float) -> float:
    p = min(1.0, max(0.0, p))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


@dataclass(frozen=True)
class Schedule:
    max_steps: int
    max_seconds: float = 0.0  # 0: step-boxed
    kind: str = "fraction"
    warmup: float = 0.05  # "fraction": share of the budget spent warming up, in [0, 1)
    warmup_steps: int = 50  # "steps": warmup length in steps
    min_ratio: float = 0.1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {', '.join(SCHEDULES)}, not {self.kind!r}"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(
                f"warmup must be a fraction of the budget in [0, 1), not {self.warmup}"
            )
        if self.max_steps < 1 or self.max_seconds < 0 or self.warmup_steps < 0:
            raise ValueError(
                f"schedule needs max_steps ≥ 1, max_seconds ≥ 0, warmup_steps ≥ 0 (got "
                f"{self.max_steps}, {self.max_seconds}, {self.warmup_steps})"
            )
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], not {self.min_ratio}")

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        """From a TrainConfig (its lr_schedule, warmup, warmup_steps, max_steps, max_minutes,
        min_lr_ratio)."""
        return cls(
            max_steps=cfg.max_steps,
            max_seconds=cfg.max_minutes * 60,
            kind=cfg.lr_schedule,
            warmup=cfg.warmup,
            warmup_steps=cfg.warmup_steps,
            min_ratio=cfg.min_lr_ratio,
        )

    def progress(self, steps: float, seconds: float) -> float:
        """Share of the budget spent after `steps` steps and `seconds` of training, in [0, 1]."""
        p = steps / self.max_steps
        if self.max_seconds > 0:
            p = max(p, seconds / self.max_seconds)
        return min(1.0, max(0.0, p))

    def factor(self, step: int, seconds: float) -> float:
        if self.kind == "steps":
            if self.max_seconds > 0:
                progress = self.progress(step, seconds)
            else:
                progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
            return lr_factor(step, self.warmup_steps, progress, self.min_ratio)
        p = self.progress(step + 1, seconds)  # the budget spent once this update is made
        if p < self.warmup:
            return p / self.warmup
        return _cosine((p - self.warmup) / (1 - self.warmup), self.min_ratio)
