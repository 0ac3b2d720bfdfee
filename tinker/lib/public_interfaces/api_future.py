"""APIFuture, where Tinker's SDK defines it (the machinery is in tinker._futures)."""

from ..._futures import APIFuture

__all__ = ["APIFuture"]
