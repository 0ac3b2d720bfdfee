"""ExperimentalWarning and `experimental`, where the Tinker SDK defines them."""

from typing_extensions import deprecated


class ExperimentalWarning(FutureWarning):
    """The category of the SDK's warnings about APIs that may change in any release (silence them
    with `warnings.filterwarnings("ignore", category=tinker.ExperimentalWarning)`)."""


experimental = deprecated
"""Marks an API that may change in any release: `@experimental("...", category=ExperimentalWarning)`
makes each call warn, as the SDK's does."""

__all__ = ["ExperimentalWarning", "experimental"]
