"""tinker: a local drop-in engine for the Tinker training API.

`import tinker` gives the Tinker SDK's surface: ServiceClient, TrainingClient, SamplingClient,
APIFuture, the types (also under `tinker.types`) and the exception classes. Everything runs in
this process on a C engine (tinker._C): LoRA training, sampling and the futures that report them.
"""

import ctypes as _ctypes
import logging as _logging
import os as _os

from ._version import __title__, __version__


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

if _os.environ.get("TINKER_LOG", "").lower() in ("debug", "info"):
    _logging.basicConfig()
    _logging.getLogger("tinker").setLevel(_os.environ["TINKER_LOG"].upper())

from . import auth, types  # noqa: E402
from ._exceptions import (  # noqa: E402
    APIConnectionError, APIError, APIResponseValidationError, APIStatusError, APITimeoutError, AuthenticationError,
    BadRequestError, BillingError, ConflictError, InternalServerError, NotFoundError,
    PermissionDeniedError, RateLimitError, RequestFailedError, SidecarDiedError, SidecarError, SidecarIPCError,
    SidecarStartupError, TinkerError, UnprocessableEntityError,
)
from ._options import RequestOptions, Timeout  # noqa: E402
from .lib.experimental import ExperimentalWarning  # noqa: E402
from .lib.public_interfaces import (  # noqa: E402
    AdminClient, APIFuture, BackcompatSamplingClientFuture, BackcompatTrainingClientFuture, LossHandle, PerDatumLossFn,
    RestClient, SamplingClient, ServiceClient, TrainingClient,
)
from .types import (  # noqa: E402
    AdamOptimizerConfig, DimuonOptimizerConfig, DimuonParams, OptimParams, PromptProvenanceSpan,
    SampledProvenanceSpan,
)
from .types import (  # noqa: E402
    AdamParams, Checkpoint, CheckpointType, Datum, DmelChunk, EncodedTextChunk, ForwardBackwardOutput, LoraConfig,
    ModelID, ModelInput, ModelInputChunk, OptimStepRequest, OptimStepResponse, ParsedCheckpointTinkerPath,
    SampledSequence, SampleRequest, SampleResponse, SamplingParams, StopReason, TensorData, TensorDtype, TrainingRun,
)

__all__ = [
    "ServiceClient", "TrainingClient", "BackcompatTrainingClientFuture", "SamplingClient",
    "BackcompatSamplingClientFuture", "RestClient", "AdminClient", "APIFuture", "auth", "Timeout", "RequestOptions",
    "AdamParams", "Checkpoint", "CheckpointType", "Datum", "DmelChunk", "EncodedTextChunk", "ForwardBackwardOutput",
    "LoraConfig", "ModelID", "ModelInput", "ModelInputChunk", "OptimStepRequest", "OptimStepResponse",
    "ParsedCheckpointTinkerPath", "SampledSequence", "SampleRequest", "SampleResponse", "SamplingParams",
    "StopReason", "TensorData", "TensorDtype", "TrainingRun",
    "TinkerError", "APIError", "APIStatusError", "BadRequestError", "AuthenticationError", "PermissionDeniedError",
    "BillingError", "NotFoundError", "ConflictError", "UnprocessableEntityError", "RateLimitError",
    "InternalServerError", "APIConnectionError", "APITimeoutError", "APIResponseValidationError", "RequestFailedError", "SidecarError",
    "SidecarStartupError", "SidecarDiedError", "SidecarIPCError", "ExperimentalWarning",
    "AdamOptimizerConfig", "DimuonOptimizerConfig", "DimuonParams", "OptimParams", "PromptProvenanceSpan",
    "SampledProvenanceSpan", "LossHandle", "PerDatumLossFn",
    "types", "__version__", "__title__",
]  # fmt: skip

# As in Tinker, the exported classes present themselves as tinker.X (pickles name them so too).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("tinker."):
        _obj.__module__ = "tinker"
del _name, _obj
