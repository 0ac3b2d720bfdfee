"""The public clients, at the import paths Tinker's SDK uses (e.g.
`from tinker.lib.public_interfaces import APIFuture`)."""

from .api_future import APIFuture
from .custom_loss import LossHandle, PerDatumLossFn
from .sampling_client import SamplingClient
from .service_client import ServiceClient
from .training_client import TrainingClient

__all__ = ["APIFuture", "LossHandle", "PerDatumLossFn", "SamplingClient", "ServiceClient", "TrainingClient"]
