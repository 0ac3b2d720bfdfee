"""ServiceClient: the entry point. It creates training and sampling clients on local base models.

Tinker's service arguments (api_key, base_url, timeout, ...) are accepted and ignored: everything
runs in this process and needs no key. All clients on one base model share one loaded copy of it.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

from ..._engine import load_model
from ..._exceptions import BadRequestError
from ..._models import available_models
from ..._restore import saved_config
from ..._training import LoraAdapter
from ...types import GetServerCapabilitiesResponse, SupportedModel
from .sampling_client import SamplingClient
from .training_client import TrainingClient


class ServiceClient:
    """Creates TrainingClients and SamplingClients. `ServiceClient()` needs no arguments."""

    def __init__(self, user_metadata: dict[str, str] | None = None, project_id: str | None = None, **kwargs):
        self.user_metadata = dict(user_metadata or {})
        self.project_id = project_id
        self.session_id = str(uuid.uuid4())
        self._training_ids = itertools.count()

    def __repr__(self) -> str:
        return f"ServiceClient(session_id={self.session_id!r})"

    # ---- capabilities ------------------------------------------------------------------

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        """The base models that load here (no downloads), with their context lengths."""
        models = [SupportedModel(model_name=name, max_context_length=ctx) for name, ctx in available_models()]
        return GetServerCapabilitiesResponse(supported_models=models)

    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        return await asyncio.to_thread(self.get_server_capabilities)

    # ---- training ----------------------------------------------------------------------

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None) -> TrainingClient:
        """A new LoRA adapter (alpha 32; A random from `seed`, B zero) on `base_model`, loaded on first use."""
        if not (train_mlp or train_attn or train_unembed):
            raise BadRequestError("at least one of train_mlp, train_attn, train_unembed must be True")
        model = load_model(base_model)
        adapter = LoraAdapter(model, rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
                              train_unembed=train_unembed)
        seq_id = next(self._training_ids)
        return TrainingClient(self, seq_id, f"{self.session_id}:train:{seq_id}", adapter=adapter,
                              base_model=base_model, user_metadata={**self.user_metadata, **(user_metadata or {})})

    async def create_lora_training_client_async(self, base_model: str, rank: int = 32, seed: int | None = None,
                                                train_mlp: bool = True, train_attn: bool = True,
                                                train_unembed: bool = True,
                                                user_metadata: dict[str, str] | None = None) -> TrainingClient:
        return await asyncio.to_thread(self.create_lora_training_client, base_model, rank, seed, train_mlp,
                                       train_attn, train_unembed, user_metadata)

    # ---- sampling ----------------------------------------------------------------------

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config=None) -> SamplingClient:
        """A sampler on `base_model`'s own weights, or on the weights saved at a tinker:// `model_path`."""
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        if model_path is not None:
            if not isinstance(model_path, str) or not model_path.startswith("tinker://"):
                raise ValueError(f"model_path must be a tinker:// path (from save_weights_for_sampler), got "
                                 f"{model_path!r}")
            return SamplingClient._for_path(self, model_path)
        return SamplingClient._for_base(self, base_model)

    async def create_sampling_client_async(self, model_path: str | None = None, base_model: str | None = None,
                                           retry_config=None) -> SamplingClient:
        return await asyncio.to_thread(self.create_sampling_client, model_path, base_model, retry_config)

    # ---- from saved state ----------------------------------------------------------------

    def _from_state(self, path: str, base_model: str | None, user_metadata, with_optimizer: bool) -> TrainingClient:
        config = saved_config(path)
        base = base_model or config.base_model
        if base is None:
            raise BadRequestError(f"{path}: the adapter does not name its base model; pass base_model=")
        client = self.create_lora_training_client(base, rank=config.rank, train_mlp=config.train_mlp,
                                                  train_attn=config.train_attn, train_unembed=config.train_unembed,
                                                  user_metadata=user_metadata)
        load = client.load_state_with_optimizer if with_optimizer else client.load_state
        load(path).result()
        return client

    def create_training_client_from_state(self, path: str, base_model: str | None = None,
                                          user_metadata: dict[str, str] | None = None,
                                          weights_access_token: str | None = None) -> TrainingClient:
        """A new training client with the LoRA config and weights saved at `path` (a tinker:// path, or a
        PEFT adapter directory); the optimizer starts afresh."""
        return self._from_state(path, base_model, user_metadata, with_optimizer=False)

    async def create_training_client_from_state_async(self, path: str, base_model: str | None = None,
                                                      user_metadata: dict[str, str] | None = None,
                                                      weights_access_token: str | None = None) -> TrainingClient:
        return await asyncio.to_thread(self._from_state, path, base_model, user_metadata, False)

    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None,
                                                         user_metadata: dict[str, str] | None = None,
                                                         weights_access_token: str | None = None
                                                         ) -> TrainingClient:
        """As create_training_client_from_state, also restoring the Adam moments and step (resuming)."""
        return self._from_state(path, base_model, user_metadata, with_optimizer=True)

    async def create_training_client_from_state_with_optimizer_async(
            self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> TrainingClient:
        return await asyncio.to_thread(self._from_state, path, base_model, user_metadata, True)

    def create_rest_client(self):
        """A RestClient over the local checkpoint store: list, inspect and delete runs and checkpoints."""
        from .rest_client import RestClient

        return RestClient(self)

    def get_telemetry(self):
        return None


__all__ = ["ServiceClient"]
