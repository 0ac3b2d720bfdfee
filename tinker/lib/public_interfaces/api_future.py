"""APIFuture and AwaitableConcurrentFuture, where Tinker's SDK defines them (the machinery is in
tinker._futures)."""

from ..._futures import APIFuture, AwaitableConcurrentFuture

__all__ = ["APIFuture", "AwaitableConcurrentFuture"]
