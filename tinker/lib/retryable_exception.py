"""RetryableException, where the Tinker SDK defines it (an error its retry logic retries)."""


class RetryableException(Exception):
    def __init__(self, message: str):
        super().__init__(message)


__all__ = ["RetryableException"]
