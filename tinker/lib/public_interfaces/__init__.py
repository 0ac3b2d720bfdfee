"""The public clients, at the import paths Tinker's SDK uses (e.g.
`from tinker.lib.public_interfaces import APIFuture`)."""

from .api_future import APIFuture, AwaitableConcurrentFuture
from .rest_client import RestClient
from .sampling_client import BackcompatSamplingClientFuture, SamplingClient
from .service_client import ServiceClient
from .training_client import BackcompatTrainingClientFuture, TrainingClient

__all__ = [
    "APIFuture", "AwaitableConcurrentFuture", "BackcompatSamplingClientFuture", "BackcompatTrainingClientFuture",
    "RestClient", "SamplingClient", "ServiceClient", "TrainingClient",
]  # fmt: skip
