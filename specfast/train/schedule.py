"""Learning rate: linear warmup over `warmup` steps, then cosine decay to min_ratio·lr as progress
goes 0 → 1. Progress is steps done / max_steps, or, with a time budget, the larger of that and the
share of the budget spent (so a time-boxed run still ends its decay on time)."""

import math


def lr_factor(step: int, warmup: int, progress: float, min_ratio: float) -> float:
    """Multiplier of the peak lr for 0-based optimizer step `step`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    p = min(1.0, max(0.0, progress))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
