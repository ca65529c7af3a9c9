"""Adapters that put specfast's kernels into other trainers (imported only on demand)."""
