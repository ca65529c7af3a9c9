"""The EAGLE-3 draft model and its configuration."""

from .config import DraftConfig
from .draft import Eagle3Draft

__all__ = ["DraftConfig", "Eagle3Draft"]
