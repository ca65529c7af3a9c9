"""`specfast eval`: acceptance length by real speculative decoding (target + EAGLE-3 draft)."""

from .evaluate import evaluate, load_for_eval, plot_acceptance, write_report
from .prompts import Prompt, read_prompts
from .stats import AcceptanceStats

__all__ = [
    "evaluate",
    "load_for_eval",
    "write_report",
    "plot_acceptance",
    "read_prompts",
    "Prompt",
    "AcceptanceStats",
]
