"""tinker.auth: the SDK's credential helpers. The local engine needs no credentials, so it always
has what it needs: there is no token, and Tinker is always accessible."""

from __future__ import annotations

import os

__all__ = ["get_tinker_token", "raise_if_tinker_not_accessible", "tinker_has_credentials"]


def get_tinker_token() -> str | None:
    """The configured static key (TINKER_API_KEY), or None. Nothing here uses it."""
    return os.environ.get("TINKER_API_KEY") or None


def tinker_has_credentials() -> bool:
    """True: running locally needs no credential, so code that checks before starting proceeds."""
    return True


def raise_if_tinker_not_accessible() -> None:
    """Returns: the local engine is in this process, so it is always accessible."""
