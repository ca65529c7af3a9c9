"""specfast: fast, lean training of EAGLE-3 speculative-decoding draft models."""

__version__ = "0.1.0"
