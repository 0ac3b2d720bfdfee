"""tinker: a local drop-in engine for the Tinker training API.

The public clients (ServiceClient, TrainingClient, SamplingClient) arrive with
the API layer; this package currently provides the engine underneath them:
model resolution and loading (tinker._models), tokenizers (tinker._tokenizer)
and the C extension (tinker._C).
"""

import ctypes as _ctypes
import os as _os

__title__ = "tinker"
__version__ = "0.1.0"


def _preload_openblas() -> None:
    """Loads the OpenBLAS that tinker._C links (from the scipy-openblas32 package) by absolute
    path, so the extension finds it wherever pip put the two packages (editable installs, venvs,
    --target directories) without LD_LIBRARY_PATH. A build against the system BLAS skips this."""
    try:
        import scipy_openblas32
    except ImportError:
        return
    lib_dir = scipy_openblas32.get_lib_dir()
    path = _os.path.join(lib_dir, f"lib{scipy_openblas32.get_library()}.so")
    if _os.path.exists(path):
        _ctypes.CDLL(path, mode=_ctypes.RTLD_GLOBAL)


_preload_openblas()
