"""RetryConfig, accepted for compatibility: local requests do not fail over a network, so nothing
is retried and these settings have no effect. Its fields and defaults are the SDK's (the SDK's
default retryable exceptions also list httpx's TimeoutException, which a local engine never raises)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Tuple, Type

from .._exceptions import APIConnectionError
from .retryable_exception import RetryableException


@dataclass
class RetryConfig:
    max_connections: Optional[int] = 1000
    progress_timeout: float = 120 * 60
    retry_delay_base: float = 0.5
    retry_delay_max: float = 10.0
    jitter_factor: float = 0.25
    enable_retry_logic: bool = True
    enable_stuck_detection: bool = True
    retryable_exceptions: Tuple[Type[Exception], ...] = (asyncio.TimeoutError, APIConnectionError, RetryableException)

    def __post_init__(self):
        if self.max_connections is not None and self.max_connections <= 0:
            raise ValueError(f"max_connections must be positive, got {self.max_connections}")

    def __hash__(self):  # the SDK's: usable as a key though mutable
        return hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))


__all__ = ["RetryConfig", "RetryableException"]
