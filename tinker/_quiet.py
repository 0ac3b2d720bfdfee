"""Importing transformers without the notices it prints into a user's session.

tinker needs transformers only for tokenizers, which need no torch, and imports it on first use.
Two notices would otherwise appear there, neither one the user can or needs to act on:
- "PyTorch was not found. Models won't be available ..." (a transformers advisory, when torch is
  not installed: tinker does not use transformers' models);
- tqdm's "IProgress not found. Please update jupyter and ipywidgets." (in a Jupyter kernel without
  ipywidgets, when transformers and huggingface_hub import `tqdm.auto`; their progress bars fall
  back to plain text, which is fine).
Both are silenced for the import alone: later advisories and the user's own tqdm use are untouched.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

_ADVISORY = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
_lock = threading.Lock()


def import_transformers():
    """The transformers module, imported quietly on first use."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"]
    with _lock:
        saved = os.environ.get(_ADVISORY)
        os.environ[_ADVISORY] = "1"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="IProgress not found")
                import transformers
        finally:
            if saved is None:
                os.environ.pop(_ADVISORY, None)
            else:
                os.environ[_ADVISORY] = saved
    return transformers
