"""RetryConfig, accepted for compatibility: local requests do not fail over a network, so nothing
is retried and these settings have no effect."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryConfig:
    max_connections: int = 100
    progress_timeout: float = 7200.0
    retry_delay_base: float = 0.5
    retry_delay_max: float = 10.0
    jitter_factor: float = 0.25
    enable_retry_logic: bool = True
    enable_stuck_detection: bool = True
    retryable_exceptions: tuple = (asyncio.TimeoutError,)


__all__ = ["RetryConfig"]
