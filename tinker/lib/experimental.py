"""ExperimentalWarning, where the Tinker SDK defines it."""


class ExperimentalWarning(FutureWarning):
    """The category of the SDK's warnings about APIs that may change in any release (silence them
    with `warnings.filterwarnings("ignore", category=tinker.ExperimentalWarning)`)."""


__all__ = ["ExperimentalWarning"]
