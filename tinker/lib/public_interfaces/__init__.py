"""The public clients, at the import paths Tinker's SDK uses (e.g.
`from tinker.lib.public_interfaces import APIFuture`)."""

from .admin_client import AdminClient
from .api_future import APIFuture, AwaitableConcurrentFuture
from .custom_loss import LossHandle, PerDatumLossFn
from .rest_client import RestClient
from .sampling_client import BackcompatSamplingClientFuture, SamplingClient
from .service_client import ServiceClient
from .training_client import BackcompatTrainingClientFuture, TrainingClient

__all__ = [
    "AdminClient", "APIFuture", "AwaitableConcurrentFuture", "BackcompatSamplingClientFuture",
    "BackcompatTrainingClientFuture",
    "LossHandle", "PerDatumLossFn", "RestClient", "SamplingClient", "ServiceClient", "TrainingClient",
]  # fmt: skip
