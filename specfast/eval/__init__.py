"""`specfast eval`: acceptance length by real speculative decoding (HF target + EAGLE-3 draft)."""
from .evaluate import evaluate, plot_acceptance, write_report
from .load import load_draft, read_draft
from .prompts import Prompt, read_prompts
from .stats import AcceptanceStats

__all__ = ["evaluate", "write_report", "plot_acceptance", "load_draft", "read_draft", "read_prompts", "Prompt",
           "AcceptanceStats"]
