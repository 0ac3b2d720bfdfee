"""Timeout and RequestOptions: Tinker's HTTP client settings, accepted for compatibility. Local
calls have no network timeouts; waiting is bounded by `APIFuture.result(timeout)`."""

from __future__ import annotations

from typing import Any, TypedDict


class Timeout:
    """Accepted and ignored (Tinker re-exports httpx.Timeout)."""

    def __init__(self, timeout: float | None = None, *, connect: float | None = None, read: float | None = None,
                 write: float | None = None, pool: float | None = None):
        self.connect = connect if connect is not None else timeout
        self.read = read if read is not None else timeout
        self.write = write if write is not None else timeout
        self.pool = pool if pool is not None else timeout

    def as_dict(self) -> dict[str, float | None]:
        return {"connect": self.connect, "read": self.read, "write": self.write, "pool": self.pool}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Timeout) and self.as_dict() == other.as_dict()

    __hash__ = None  # mutable and compared by value, as httpx.Timeout

    def __repr__(self) -> str:
        return f"Timeout(connect={self.connect}, read={self.read}, write={self.write}, pool={self.pool})"


class RequestOptions(TypedDict, total=False):
    headers: dict[str, str]
    max_retries: int
    timeout: float | Timeout | None
    params: dict[str, Any]
    extra_json: dict[str, Any]
    idempotency_key: str
